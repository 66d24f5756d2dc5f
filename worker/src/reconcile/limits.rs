//! The deletion limits of a run (`--max-delete N|P%`), one per kind, that mean what they say:
//! - each kind's limit is computed once, from the rows stored when the run starts (`P%` of
//!   them, at least [`MaxDelete::FLOOR`](super::MaxDelete::FLOOR) unless `P` is 0; `N` as
//!   given), and bounds everything of that kind the run deletes;
//! - memberships deleted with their user or organization (the `.deleted` rules remove them in
//!   the same transaction) count against the memberships limit, before they go;
//! - `--max-delete 0` (or `0%`) deletes nothing;
//! - a deletion phase that would go past what is left of its kind's limit (or of the
//!   memberships limit, for what goes with it) deletes nothing, the summary's `refused` says so,
//!   and the run fails.

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;

use super::{Kind, MaxDelete};
use crate::apply::retry_read;

/// A deletion phase that deleted nothing because of a limit: what the summary shows under
/// `refused`, keyed by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// Objects of the kind confirmed gone from Clerk before the phase stopped (when the kind's
    /// own limit refused it, the checks stop at one past the limit: at least this many).
    pub gone: u64,
    /// What was left of the kind's limit.
    pub limit: u64,
    /// Memberships that would have gone with them (users and organizations only).
    pub memberships_with_them: u64,
    /// What was left of the memberships limit.
    pub memberships_limit: u64,
    /// The reason, as the run's failure says it.
    pub reason: String,
}

/// What a run may still delete of each kind.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    max_delete: MaxDelete,
    left: BTreeMap<&'static str, u64>,
}

impl Budget {
    /// The limits of a run, from the rows stored now.
    pub(crate) async fn at_start<C: ConnectionTrait>(
        db: &C,
        max_delete: MaxDelete,
    ) -> Result<Self, String> {
        let statement = Statement::from_string(
            DbBackend::Postgres,
            // Rows kept after an earlier deletion (`WORKER_DELETE_MODE`) are not part of the
            // table a limit is a share of.
            "SELECT (SELECT count(*) FROM users WHERE deleted_at IS NULL) AS users, \
                    (SELECT count(*) FROM organizations WHERE deleted_at IS NULL) AS organizations, \
                    (SELECT count(*) FROM organization_memberships WHERE deleted_at IS NULL) \
                      AS memberships",
        );
        let what = "counting the stored rows";
        let row = retry_read(what, || db.query_one_raw(statement.clone()))
            .await?
            .ok_or_else(|| format!("{what}: no answer"))?;
        let mut left = BTreeMap::new();
        for kind in Kind::ALL {
            let rows: i64 = row
                .try_get("", kind.name())
                .map_err(|e| format!("{what}: {e}"))?;
            left.insert(kind.name(), max_delete.limit(rows.max(0) as u64));
        }
        Ok(Self { max_delete, left })
    }

    /// What is left of `kind`'s limit.
    pub(crate) fn left(&self, kind: Kind) -> u64 {
        self.left.get(kind.name()).copied().unwrap_or(0)
    }

    /// Whether `gone` objects of `kind` and the `memberships_with_them` that go with them fit
    /// in what is left; if so, they are taken from it.
    pub(crate) fn take(
        &mut self,
        kind: Kind,
        gone: u64,
        memberships_with_them: u64,
    ) -> Result<(), Refused> {
        let limit = self.left(kind);
        let memberships_limit = self.left(Kind::Memberships);
        let name = kind.name();
        let refused = |reason: String| Refused {
            gone,
            limit,
            memberships_with_them,
            memberships_limit,
            reason,
        };
        if gone > limit {
            return Err(refused(format!(
                "the deletion phase would remove more than {limit} {name} (--max-delete {}); \
                 no {name} were deleted",
                self.max_delete
            )));
        }
        if kind != Kind::Memberships && memberships_with_them > memberships_limit {
            return Err(refused(format!(
                "deleting the {gone} {name} gone from Clerk would remove their \
                 {memberships_with_them} memberships with them, more than the \
                 {memberships_limit} memberships --max-delete {} leaves; no {name} were deleted",
                self.max_delete
            )));
        }
        *self.left.entry(name).or_default() -= gone;
        if kind != Kind::Memberships {
            *self.left.entry(Kind::Memberships.name()).or_default() -= memberships_with_them;
        }
        Ok(())
    }
}

/// How many stored memberships go with the users or organizations of `kind` that the deletion
/// phase found gone (`super::listed::gone`) when they are deleted. In a dry run, leaving out
/// those whose other owner the dry run already counted as deleted (a real run would have removed
/// them with it). Each membership is looked up by primary key, as the deletion phase's
/// candidates are (`OFFSET 0`: see `missing_condition` there).
pub(crate) async fn memberships_going_with<C: ConnectionTrait>(
    db: &C,
    kind: Kind,
    listing_id: &str,
    dry_run: bool,
) -> Result<u64, String> {
    let column = match kind {
        Kind::Users => "user_id",
        Kind::Organizations => "organization_id",
        Kind::Memberships => return Ok(0),
    };
    let before = if dry_run {
        format!(
            " AND NOT EXISTS (SELECT 1 FROM reconcile_listed b WHERE b.listing_id = $1 \
               AND b.kind <> $2 AND b.kind IN ('{}', '{}') \
               AND b.id IN (m.user_id, m.organization_id) OFFSET 0)",
            super::listed::gone(Kind::Users),
            super::listed::gone(Kind::Organizations)
        )
    } else {
        String::new()
    };
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT count(*) AS n FROM organization_memberships m \
             WHERE m.deleted_at IS NULL AND EXISTS (SELECT 1 FROM reconcile_listed g \
               WHERE g.listing_id = $1 AND g.kind = $2 AND g.id = m.{column} OFFSET 0)\
             {before}"
        ),
        [listing_id.into(), super::listed::gone(kind).into()],
    );
    let what = format!("counting the memberships of the {} to delete", kind.name());
    let row = retry_read(&what, || db.query_one_raw(statement.clone())).await?;
    let n: i64 = match row {
        Some(row) => row.try_get("", "n").map_err(|e| format!("{what}: {e}"))?,
        None => 0,
    };
    Ok(n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(users: u64, organizations: u64, memberships: u64) -> Budget {
        Budget {
            max_delete: MaxDelete::Rows(0),
            left: BTreeMap::from([
                ("users", users),
                ("organizations", organizations),
                ("memberships", memberships),
            ]),
        }
    }

    #[test]
    fn memberships_that_go_with_their_user_use_up_the_memberships_limit() {
        let mut budget = budget(10, 10, 10);
        assert_eq!(budget.take(Kind::Users, 2, 6), Ok(()));
        assert_eq!(budget.left(Kind::Users), 8);
        assert_eq!(budget.left(Kind::Memberships), 4);
        let refused = budget
            .take(Kind::Organizations, 1, 5)
            .expect_err("5 memberships, 4 left");
        assert_eq!(refused.memberships_limit, 4);
        assert!(
            refused
                .reason
                .contains("would remove their 5 memberships with them"),
            "{}",
            refused.reason
        );
        assert!(refused.reason.contains("no organizations were deleted"));
        // Refused: nothing taken.
        assert_eq!(budget.left(Kind::Organizations), 10);
        assert_eq!(budget.left(Kind::Memberships), 4);
        assert!(budget.take(Kind::Memberships, 5, 0).is_err());
        assert_eq!(budget.take(Kind::Memberships, 4, 0), Ok(()));
        assert_eq!(budget.left(Kind::Memberships), 0);
    }

    #[test]
    fn a_limit_of_zero_refuses_the_first_deletion() {
        let mut budget = budget(0, 0, 0);
        assert_eq!(budget.take(Kind::Users, 0, 0), Ok(()));
        let refused = budget.take(Kind::Users, 1, 0).expect_err("zero");
        assert!(
            refused.reason.contains("more than 0 users"),
            "{}",
            refused.reason
        );
    }
}
