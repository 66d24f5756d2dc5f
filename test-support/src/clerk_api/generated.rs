//! Users the stand-in makes from their position when a request asks for them, so a listing of
//! a million users costs the memory of one page.

use std::sync::Arc;

use serde_json::Value;

use super::State;
use super::routes::{Listing, Refusal, UNKNOWN_CURSOR, failing_from};

/// What every generated id starts with, before the ten digits of its position.
const PREFIX: &str = "user_gen";

/// The id of the generated user at `position`: ids sort as positions do.
pub fn generated_user_id(position: usize) -> String {
    format!("{PREFIX}{position:010}")
}

/// The position a generated id names, if it is one.
fn position(id: &str) -> Option<usize> {
    let digits = id.strip_prefix(PREFIX)?;
    if digits.len() != 10 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

type MakeUser = dyn Fn(usize) -> Value + Send + Sync;

/// `count` users, the one at position `p` made by `make(p)` with its id set.
pub(super) struct Generated {
    pub(super) count: usize,
    make: Arc<MakeUser>,
}

impl Generated {
    pub(super) fn new(count: usize, make: impl Fn(usize) -> Value + Send + Sync + 'static) -> Self {
        Self {
            count,
            make: Arc::new(make),
        }
    }

    fn user(&self, position: usize) -> Value {
        let mut user = (self.make)(position);
        if let Some(object) = user.as_object_mut() {
            object.insert("id".into(), generated_user_id(position).into());
        }
        user
    }

    /// The user with this id, if it is one of them.
    pub(super) fn get(&self, id: &str) -> Option<Value> {
        position(id)
            .filter(|&position| position < self.count)
            .map(|position| self.user(position))
    }

    /// One page of `GET /v1/users`, as the stand-in answers it for stored users.
    pub(super) fn page(
        &self,
        state: &State,
        params: &[(String, String)],
    ) -> Result<Vec<Value>, Refusal> {
        let listing = Listing::read(params, true)?;
        let cursor = match listing.after {
            Some(id) => Some(
                position(id)
                    .filter(|&position| position < self.count)
                    .ok_or(UNKNOWN_CURSOR)?,
            ),
            None => None,
        };
        // Where the page starts in the listing's order, and the positions from there on.
        let (start, positions): (usize, Box<dyn Iterator<Item = usize>>) =
            match (cursor, listing.ascending) {
                (Some(at), true) => (at + 1, Box::new(at + 1..self.count)),
                (Some(at), false) => (self.count - at, Box::new((0..at).rev())),
                (None, true) => (listing.offset, Box::new(listing.offset..self.count)),
                (None, false) => (
                    listing.offset,
                    Box::new((0..self.count).rev().skip(listing.offset)),
                ),
            };
        failing_from(state, start)?;
        Ok(positions
            .filter(|&position| !state.hidden.contains(&generated_user_id(position)))
            .take(listing.limit)
            .map(|position| self.user(position))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_position_and_nothing_else() {
        assert_eq!(generated_user_id(42), "user_gen0000000042");
        assert_eq!(position(&generated_user_id(1_000_000)), Some(1_000_000));
        assert_eq!(position("user_gen42"), None);
        assert_eq!(position("user_0000000042"), None);
        assert_eq!(position("user_gen00000000x2"), None);
    }
}
