//! The roles a user can hold. They are configuration (`WORKER_ROLES`, `WORKER_DEFAULT_ROLE`), not
//! schema: a user's role is `public_metadata.role` when it names a configured role, else the
//! default. Clerk does not validate metadata, so nothing else found there is ever trusted.

use serde_json::Value;

/// The configured roles and the default one, which is always among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    names: Vec<String>,
    default: String,
}

/// Why a roles setting cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RolesError {
    #[error("names no role")]
    Empty,
    #[error("{default:?} is not one of the roles ({names})")]
    DefaultNotListed { default: String, names: String },
}

/// How a user's role was found in `public_metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSource {
    /// `role` names a configured role.
    Known,
    /// No `role` key (or a null one): the default role, nothing to warn about.
    Absent,
    /// `role` holds something else; the value (as JSON text) is for a warning, never trusted.
    Unknown(String),
}

impl Roles {
    /// The roles named, in order and without repeats, with `default` among them. Names are
    /// compared exactly: `Admin` is not `admin`.
    pub fn new<I, S>(names: I, default: &str) -> Result<Self, RolesError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut unique: Vec<String> = Vec::new();
        for name in names {
            let name = name.into();
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        if unique.is_empty() {
            return Err(RolesError::Empty);
        }
        if !unique.iter().any(|name| name == default) {
            return Err(RolesError::DefaultNotListed {
                default: default.to_owned(),
                names: unique.join(", "),
            });
        }
        Ok(Self {
            names: unique,
            default: default.to_owned(),
        })
    }

    /// Splits a `WORKER_ROLES` value: names separated by commas, surrounding spaces and empty
    /// entries dropped.
    pub fn split_list(list: &str) -> impl Iterator<Item = &str> {
        list.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
    }

    /// Every configured role, in the order given.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The role of a user whose metadata names no configured role.
    pub fn default_role(&self) -> &str {
        &self.default
    }

    pub fn contains(&self, role: &str) -> bool {
        self.names.iter().any(|name| name == role)
    }

    /// The role for a user's `public_metadata`: its `role` when that is a configured role, else
    /// the default, with how it was found.
    pub fn resolve(&self, public_metadata: &Value) -> (String, RoleSource) {
        match public_metadata.get("role") {
            None | Some(Value::Null) => (self.default.clone(), RoleSource::Absent),
            Some(Value::String(role)) if self.contains(role) => (role.clone(), RoleSource::Known),
            Some(other) => (self.default.clone(), RoleSource::Unknown(other.to_string())),
        }
    }
}

impl Default for Roles {
    /// `admin`, `trainer` and `client`, with `client` the default.
    fn default() -> Self {
        Self {
            names: vec!["admin".into(), "trainer".into(), "client".into()],
            default: "client".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_default_roles_are_the_seeds_with_client_the_default() {
        let roles = Roles::default();
        assert_eq!(roles.names(), ["admin", "trainer", "client"]);
        assert_eq!(roles.default_role(), "client");
        assert_eq!(
            Roles::new(["admin", "trainer", "client"], "client").expect("roles"),
            roles
        );
    }

    #[test]
    fn unknown_or_mistyped_roles_fall_back_to_the_default_and_are_reported() {
        let roles = Roles::default();
        for (role, expected) in [
            (json!("admin"), ("admin", RoleSource::Known)),
            (json!("client"), ("client", RoleSource::Known)),
            (json!(null), ("client", RoleSource::Absent)),
            (
                json!("superuser"),
                ("client", RoleSource::Unknown("\"superuser\"".into())),
            ),
            (
                json!("Admin"),
                ("client", RoleSource::Unknown("\"Admin\"".into())),
            ),
            (
                json!(["admin"]),
                ("client", RoleSource::Unknown("[\"admin\"]".into())),
            ),
            (json!(7), ("client", RoleSource::Unknown("7".into()))),
        ] {
            let (name, source) = roles.resolve(&json!({ "role": role }));
            assert_eq!((name.as_str(), source), expected, "role {role}");
        }
        assert_eq!(
            roles.resolve(&json!(null)),
            ("client".into(), RoleSource::Absent)
        );
        assert_eq!(
            roles.resolve(&json!("not an object")),
            ("client".into(), RoleSource::Absent)
        );
    }

    #[test]
    fn custom_roles_replace_the_seeds() {
        let roles = Roles::new(["owner", "editor", "viewer"], "viewer").expect("roles");
        assert_eq!(
            roles.resolve(&json!({"role": "editor"})),
            ("editor".into(), RoleSource::Known)
        );
        assert_eq!(
            roles.resolve(&json!({"role": "admin"})),
            ("viewer".into(), RoleSource::Unknown("\"admin\"".into()))
        );
    }

    #[test]
    fn a_list_is_split_on_commas_and_repeats_are_dropped() {
        let names: Vec<&str> = Roles::split_list(" owner, editor ,,viewer,owner ").collect();
        assert_eq!(names, ["owner", "editor", "viewer", "owner"]);
        let roles = Roles::new(names, "owner").expect("roles");
        assert_eq!(roles.names(), ["owner", "editor", "viewer"]);
    }

    #[test]
    fn the_default_must_be_listed_and_the_list_not_empty() {
        assert_eq!(
            Roles::new(["owner", "editor"], "viewer").expect_err("unlisted default"),
            RolesError::DefaultNotListed {
                default: "viewer".into(),
                names: "owner, editor".into()
            }
        );
        assert_eq!(
            Roles::new(Vec::<String>::new(), "viewer").expect_err("empty"),
            RolesError::Empty
        );
    }
}
