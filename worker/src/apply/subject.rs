//! The kinds of subject the door writes: one list of what each is called in the history, which
//! table holds it and which table holds its tombstones.

/// A user, an organization or a membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKind {
    User,
    Organization,
    Membership,
}

impl SubjectKind {
    /// Every kind, in the order their tables are derived and shown: users, organizations,
    /// memberships (a membership carries an organization snapshot).
    pub const ALL: [SubjectKind; 3] = [
        SubjectKind::User,
        SubjectKind::Organization,
        SubjectKind::Membership,
    ];

    /// The label kept in `processed_events.subject_kind`.
    pub fn label(self) -> &'static str {
        match self {
            SubjectKind::User => "user",
            SubjectKind::Organization => "organization",
            SubjectKind::Membership => "membership",
        }
    }

    /// The kind a history label names.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.label() == label)
    }

    /// The synced table of the kind.
    pub fn table(self) -> &'static str {
        match self {
            SubjectKind::User => "users",
            SubjectKind::Organization => "organizations",
            SubjectKind::Membership => "organization_memberships",
        }
    }

    /// The table of the kind's tombstones.
    pub fn tombstone_table(self) -> &'static str {
        match self {
            SubjectKind::User => "user_tombstones",
            SubjectKind::Organization => "organization_tombstones",
            SubjectKind::Membership => "membership_tombstones",
        }
    }
}

/// What an event concerns: the row its history belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub kind: SubjectKind,
    pub id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_label() {
        for kind in SubjectKind::ALL {
            assert_eq!(SubjectKind::from_label(kind.label()), Some(kind));
        }
        assert_eq!(SubjectKind::from_label("session"), None);
    }
}
