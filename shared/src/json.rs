//! JSON text of any depth. serde_json stops at 128 levels of nesting, but an end user can nest
//! `unsafe_metadata` deeper than that from the browser (Clerk bounds metadata by size, 8 KB, not
//! by depth), and an event turned away as "not JSON" would stop that user's sync: the ingest
//! would answer 400 to a correctly signed event, the worker dead-letter it, a reconcile fail on
//! the listing page that holds the user. So the binaries read what comes from outside (webhook
//! bodies, Backend API answers, stored history, dead letters) here: no depth limit, and the
//! stack grown on the heap as deep as the text goes.

use serde::Deserialize;

/// The stack a thread that handles events needs. Reading is not the only recursive walk: a
/// `serde_json::Value` is cloned, compared, dropped and written back recursively, about 1 KiB
/// of stack a level in a debug build. Clerk bounds each metadata field to 8 KB, which nests at
/// most 4,096 levels (`[` and `]`, two bytes a level): 8 MiB holds that with room to spare,
/// where tokio's default 2 MiB holds about 1,500.
pub const THREAD_STACK: usize = 8 << 20;

/// Reads `T` from JSON text, however deeply it nests.
pub fn from_slice<'de, T: Deserialize<'de>>(text: &'de [u8]) -> serde_json::Result<T> {
    let mut reader = serde_json::Deserializer::from_slice(text);
    reader.disable_recursion_limit();
    let value = T::deserialize(serde_stacker::Deserializer::new(&mut reader))?;
    // Like `serde_json::from_slice`: only whitespace may follow the value.
    reader.end()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::from_slice;

    /// `{"a":{"a":…{"a":1}…}}`, `depth` objects deep.
    fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    /// The deepest 8 KB of metadata (Clerk's bound) can nest: arrays, two bytes a level.
    const DEEPEST_ARRAYS: usize = 4_096;
    /// And objects, six bytes a level (`{"a":` and `}`).
    const DEEPEST_OBJECTS: usize = 1_366;

    /// Runs `walk` on a thread with the stack the worker gives its threads.
    fn on_an_event_thread(walk: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(super::THREAD_STACK)
            .spawn(walk)
            .expect("thread")
            .join()
            .expect("the walk ends");
    }

    #[test]
    fn reads_the_deepest_metadata_clerk_sends_which_serde_json_refuses() {
        on_an_event_thread(|| {
            let text = nested(DEEPEST_OBJECTS);
            assert!(
                serde_json::from_str::<Value>(&text).is_err(),
                "serde_json's limit"
            );
            let value: Value = from_slice(text.as_bytes()).expect("read");
            let mut inner = &value;
            for _ in 0..DEEPEST_OBJECTS {
                inner = &inner["a"];
            }
            assert_eq!(inner, &Value::from(1));
            assert_eq!(value.clone(), value, "cloned and compared");

            let arrays = format!(
                "{}1{}",
                "[".repeat(DEEPEST_ARRAYS),
                "]".repeat(DEEPEST_ARRAYS)
            );
            let value: Value = from_slice(arrays.as_bytes()).expect("read");
            assert_eq!(value.clone().to_string(), arrays, "written back whole");
        });
    }

    #[test]
    fn skips_deep_fields_a_struct_does_not_ask_for() {
        #[derive(serde::Deserialize)]
        struct Typed {
            r#type: String,
        }
        let text = format!(r#"{{"data":{},"type":"user.updated"}}"#, nested(1_000));
        let typed: Typed = from_slice(text.as_bytes()).expect("read");
        assert_eq!(typed.r#type, "user.updated");
    }

    #[test]
    fn refuses_what_serde_json_refuses_otherwise() {
        assert!(from_slice::<Value>(b"{\"a\":1} trailing").is_err());
        assert!(from_slice::<Value>(b"{\"a\":").is_err());
        assert!(from_slice::<Value>(b"").is_err());
    }
}
