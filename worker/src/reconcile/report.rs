//! What a run did: the counts of each kind, the summary `--json` prints, and the report.

use serde::Serialize;
use serde_json::{Value, json};

use super::Kind;

/// What became of one kind of object. In a dry run: what would have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Objects the listing returned.
    pub listed: u64,
    /// Written where no row was.
    pub created: u64,
    /// Written over an older stored version.
    pub updated: u64,
    /// Stored exactly as listed (same `updated_at`); not written.
    pub unchanged: u64,
    /// Postgres already had a newer version, or a tombstone; not written.
    pub stale: u64,
    /// Stored, not listed, and gone from Clerk (404): deleted and tombstoned.
    pub deleted: u64,
}

/// The summary of a run: `--json` prints exactly this.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub users: Counts,
    pub organizations: Counts,
    pub memberships: Counts,
    /// Wall time of the run.
    pub seconds: f64,
    /// The kinds whose deletion phase a limit refused (nothing of them was deleted), by name;
    /// absent when none was.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused: std::collections::BTreeMap<&'static str, super::limits::Refused>,
    /// Set when the run continued the listing of an interrupted run instead of starting from
    /// the first page; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
}

/// Where a run took up an interrupted run's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resumed {
    /// The interrupted run.
    pub run_id: String,
    /// The kind whose listing it continued (the kinds before it were done).
    pub kind: &'static str,
    /// Where: the last user listed (`starting_after`), or the offset of organizations or
    /// memberships; `None` from the kind's first page.
    pub after: Option<String>,
}

impl Resumed {
    /// "the users listing of run R after user_123".
    fn describe(&self) -> String {
        let at = match &self.after {
            None => "from its first page".to_owned(),
            Some(after) if self.kind == "users" => format!("after {after}"),
            Some(offset) => format!("at offset {offset}"),
        };
        format!(
            "Resumed the {} listing of interrupted run {} {at}.",
            self.kind, self.run_id
        )
    }
}

impl Summary {
    /// The counts of one kind.
    pub fn of(&self, kind: Kind) -> &Counts {
        match kind {
            Kind::Users => &self.users,
            Kind::Organizations => &self.organizations,
            Kind::Memberships => &self.memberships,
        }
    }

    pub(super) fn of_mut(&mut self, kind: Kind) -> &mut Counts {
        match kind {
            Kind::Users => &mut self.users,
            Kind::Organizations => &mut self.organizations,
            Kind::Memberships => &mut self.memberships,
        }
    }

    /// What `reconcile_runs.counts` holds: the counts of every kind, by name.
    pub(super) fn counts_json(&self) -> Value {
        Value::Object(
            Kind::ALL
                .iter()
                .map(|&kind| (kind.name().to_owned(), json!(self.of(kind))))
                .collect(),
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// The `reconcile_runs` id (also part of the svix-ids the run records).
    pub run_id: String,
    pub dry_run: bool,
    pub summary: Summary,
    /// Why the tables may not match the listing; `None` when they do.
    pub failure: Option<String>,
    /// Set when the run stopped before its first listing because the key belongs to another
    /// Clerk instance than the one the database mirrors (`failure` says the same).
    pub wrong_instance: Option<super::instance::WrongInstance>,
    /// The run was stopped (SIGTERM, SIGINT, its worker stopping) and recorded `interrupted`:
    /// the next run resumes its listing (`failure` says so too).
    pub interrupted: bool,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }

    /// The one-paragraph summary for a person.
    pub fn paragraph(&self) -> String {
        let dry = if self.dry_run {
            " Dry run, nothing written: these are the changes it would have made."
        } else {
            ""
        };
        let kinds: String = Kind::ALL
            .iter()
            .map(|&kind| {
                let c = self.summary.of(kind);
                let name = kind.name();
                let capital = name[..1].to_uppercase() + &name[1..];
                let refused = match self.summary.refused.get(name) {
                    Some(refused) => format!(
                        " (deletion refused by --max-delete: {} gone from Clerk kept)",
                        refused.gone
                    ),
                    None => String::new(),
                };
                format!(
                    " {capital}: {} listed, {} created, {} updated, {} unchanged, {} stale, {} \
                     deleted{refused}.",
                    c.listed, c.created, c.updated, c.unchanged, c.stale, c.deleted
                )
            })
            .collect();
        let end = match &self.failure {
            None => "The tables match Clerk.".to_owned(),
            Some(why) if self.interrupted => format!("INTERRUPTED: {why}"),
            Some(why) => format!("FAILED: {why}"),
        };
        let resumed = match &self.summary.resumed {
            Some(resumed) => format!(" {}", resumed.describe()),
            None => String::new(),
        };
        format!(
            "Reconcile {} in {:.1} s.{dry}{resumed}{kinds} {end}",
            self.run_id, self.summary.seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_summary_has_the_documented_shape() {
        let summary = Summary {
            users: Counts {
                listed: 3,
                created: 1,
                updated: 1,
                unchanged: 1,
                stale: 0,
                deleted: 2,
            },
            organizations: Counts {
                listed: 2,
                created: 2,
                ..Counts::default()
            },
            memberships: Counts {
                listed: 1,
                stale: 1,
                ..Counts::default()
            },
            seconds: 1.5,
            refused: Default::default(),
            resumed: None,
        };
        let zero = |listed, created, stale| {
            json!({"listed": listed, "created": created, "updated": 0, "unchanged": 0,
                   "stale": stale, "deleted": 0})
        };
        assert_eq!(
            serde_json::to_value(&summary).expect("json"),
            json!({"users": {"listed": 3, "created": 1, "updated": 1, "unchanged": 1,
                             "stale": 0, "deleted": 2},
                   "organizations": zero(2, 2, 0), "memberships": zero(1, 0, 1),
                   "seconds": 1.5})
        );
        let mut counts = summary.counts_json();
        counts["seconds"] = json!(1.5);
        assert_eq!(counts, serde_json::to_value(&summary).expect("json"));
    }

    #[test]
    fn the_paragraph_names_every_kind() {
        let report = Report {
            run_id: "r1".into(),
            dry_run: true,
            summary: Summary {
                memberships: Counts {
                    deleted: 4,
                    ..Counts::default()
                },
                ..Summary::default()
            },
            failure: None,
            wrong_instance: None,
            interrupted: false,
        };
        let text = report.paragraph();
        assert!(text.contains("Dry run, nothing written"), "{text}");
        assert!(text.contains(" Users: 0 listed"), "{text}");
        assert!(text.contains(" Organizations: 0 listed"), "{text}");
        assert!(
            text.contains(
                " Memberships: 0 listed, 0 created, 0 updated, 0 unchanged, 0 stale, 4 deleted."
            ),
            "{text}"
        );
        assert!(text.ends_with("The tables match Clerk."), "{text}");
    }

    #[test]
    fn a_resumed_run_says_from_where() {
        let resumed = |kind, after: Option<&str>| Resumed {
            run_id: "r0".into(),
            kind,
            after: after.map(str::to_owned),
        };
        assert_eq!(
            resumed("users", Some("user_9")).describe(),
            "Resumed the users listing of interrupted run r0 after user_9."
        );
        assert_eq!(
            resumed("memberships", Some("1500")).describe(),
            "Resumed the memberships listing of interrupted run r0 at offset 1500."
        );
        assert_eq!(
            resumed("organizations", None).describe(),
            "Resumed the organizations listing of interrupted run r0 from its first page."
        );
        let summary = Summary {
            resumed: Some(resumed("users", Some("user_9"))),
            ..Summary::default()
        };
        assert_eq!(
            serde_json::to_value(&summary).expect("json")["resumed"],
            json!({"run_id": "r0", "kind": "users", "after": "user_9"})
        );
    }
}
