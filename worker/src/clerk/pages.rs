//! The listings of the Backend API as pages the caller walks: users by cursor, organizations
//! and memberships by offset.

use serde_json::value::RawValue;

use super::{ClerkClient, ClerkError, DataPage, MAX_PAGE, decode, object_id};

/// The users of the instance as pages, walked with the `starting_after` cursor in
/// `+created_at` order (an offset walk gets slow on large instances, and skips users when
/// others are deleted meanwhile). A page shorter than the limit is the last.
pub struct UserPages<'a> {
    pub(super) client: &'a ClerkClient,
    pub(super) limit: u32,
    pub(super) cursor: Option<String>,
    pub(super) done: bool,
}

impl UserPages<'_> {
    /// The listing continued after this user (an interrupted listing's last one), instead of
    /// from the first.
    pub fn starting_after(mut self, cursor: String) -> Self {
        self.cursor = Some(cursor);
        self
    }

    /// The id of the last user of the latest page: where the listing goes on from.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// The next page of user objects as Clerk wrote them, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Box<RawValue>>>, ClerkError> {
        if self.done {
            return Ok(None);
        }
        let call = "GET /v1/users";
        let mut query = vec![
            ("limit", self.limit.to_string()),
            ("order_by", "+created_at".to_owned()),
        ];
        if let Some(cursor) = &self.cursor {
            query.push(("starting_after", cursor.clone()));
        }
        let body = self.client.get(call, "/v1/users", &query).await?;
        let page: Vec<Box<RawValue>> = decode(call, &body)?;
        if page.len() < self.limit as usize {
            self.done = true;
        }
        match page.last().and_then(|user| object_id(user)) {
            Some(id) => self.cursor = Some(id),
            None if page.is_empty() => return Ok(None),
            None => {
                return Err(ClerkError::Decode {
                    call: call.into(),
                    reason: "the last user of a page has no id".into(),
                });
            }
        }
        Ok(Some(page))
    }
}

/// A listing that answers `{"data": [...], "total_count": N}` (organizations, memberships), as
/// pages walked with `offset` in `+created_at` order: these endpoints have no cursor. Objects
/// created meanwhile come last, so they shift nothing; one deleted meanwhile shifts the later
/// ones back, and one of them may be skipped: a listing never proves a deletion on its own.
/// A page shorter than the limit is the last.
pub struct OffsetPages<'a> {
    pub(super) client: &'a ClerkClient,
    pub(super) call: &'static str,
    pub(super) path: &'static str,
    pub(super) limit: u32,
    pub(super) offset: u64,
    pub(super) total: Option<u64>,
    pub(super) done: bool,
}

impl<'a> OffsetPages<'a> {
    pub(super) fn new(
        client: &'a ClerkClient,
        call: &'static str,
        path: &'static str,
        limit: u32,
    ) -> Self {
        Self {
            client,
            call,
            path,
            limit: limit.clamp(1, MAX_PAGE),
            offset: 0,
            total: None,
            done: false,
        }
    }

    /// The listing continued from this offset (an interrupted listing's), instead of from the
    /// first object.
    pub fn from_offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// The offset of the next page: where the listing goes on from.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Clerk's `total_count` of the latest page, once one was fetched.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The next page of objects as Clerk wrote them, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Box<RawValue>>>, ClerkError> {
        if self.done {
            return Ok(None);
        }
        let query = [
            ("limit", self.limit.to_string()),
            ("offset", self.offset.to_string()),
            ("order_by", "+created_at".to_owned()),
        ];
        let body = self.client.get(self.call, self.path, &query).await?;
        let page: DataPage = decode(self.call, &body)?;
        self.total = Some(page.total_count);
        self.offset += page.data.len() as u64;
        if page.data.len() < self.limit as usize {
            self.done = true;
        }
        if page.data.is_empty() {
            return Ok(None);
        }
        Ok(Some(page.data))
    }
}
