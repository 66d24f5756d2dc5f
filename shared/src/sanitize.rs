//! JSON text made storable in Postgres. Valid JSON can carry two things Postgres refuses: the
//! escaped NUL character (`\u0000`), which neither `text` nor `jsonb` can hold, and lone UTF-16
//! surrogate escapes (`\ud800` without its low half, or a low half alone), which `jsonb` refuses
//! and which serde_json refuses too when it reads them into a `String`. End users can type both
//! (`unsafe_metadata` is writable from the browser), so a body that carries them would never
//! apply. [`strip_unstorable`] removes them from the raw text, before anything parses it, so the
//! names, the metadata, `clerk_data` and the history payload are all read from the same clean
//! text.
//!
//! It works on the text rather than on parsed values because a lone surrogate cannot be parsed
//! into a `String` at all, and because the history keeps the body's text.

use std::borrow::Cow;

/// `json` without the escapes Postgres cannot store: every `\u0000`, and every surrogate escape
/// that is not a high half directly followed by a low half, inside strings (keys included) at
/// any depth. Everything else is kept byte for byte: a valid surrogate pair, the other escaped
/// control characters, an escaped backslash followed by the letters `u0000` (the text `\u0000`,
/// which Postgres stores), and text that is not JSON at all (the parser that reads it next
/// refuses it). Borrows when there is nothing to remove.
pub fn strip_unstorable(json: &[u8]) -> Cow<'_, [u8]> {
    let mut clean: Option<Vec<u8>> = None;
    // Start of the input not yet copied into `clean`.
    let mut copied = 0;
    let mut in_string = false;
    let mut at = 0;
    while at < json.len() {
        match json[at] {
            b'"' => {
                in_string = !in_string;
                at += 1;
            }
            b'\\' if in_string => {
                let remove = match json.get(at + 1) {
                    Some(b'u') => unstorable_escape(json, at),
                    _ => None,
                };
                match remove {
                    Some(length) => {
                        let clean = clean.get_or_insert_with(|| Vec::with_capacity(json.len()));
                        clean.extend_from_slice(&json[copied..at]);
                        at += length;
                        copied = at;
                    }
                    // A kept escape: the backslash and what it escapes (a quote, a backslash,
                    // `u` and its digits, …), so an escaped backslash never starts an escape.
                    None => at += escape_length(json, at),
                }
            }
            _ => at += 1,
        }
    }
    match clean {
        Some(mut clean) => {
            clean.extend_from_slice(&json[copied..]);
            Cow::Owned(clean)
        }
        None => Cow::Borrowed(json),
    }
}

/// Whether `json` holds nothing [`strip_unstorable`] would remove.
pub fn is_storable(json: &[u8]) -> bool {
    matches!(strip_unstorable(json), Cow::Borrowed(_))
}

/// For the `\u` escape at `at`: the number of bytes to remove (6) when it is `\u0000` or a
/// surrogate without its other half, else `None`. A high half followed by its low half is kept
/// (the pair is skipped as one by [`escape_length`]).
fn unstorable_escape(json: &[u8], at: usize) -> Option<usize> {
    let unit = hex_unit(json, at)?;
    match unit {
        0 => Some(6),
        0xD800..=0xDBFF => match hex_unit(json, at + 6) {
            Some(0xDC00..=0xDFFF) => None,
            _ => Some(6),
        },
        0xDC00..=0xDFFF => Some(6),
        _ => None,
    }
}

/// The length of the kept escape at `at`: 12 for a surrogate pair, 6 for another `\uXXXX`, 2
/// for any other (a malformed one included: the parser reports it).
fn escape_length(json: &[u8], at: usize) -> usize {
    match hex_unit(json, at) {
        Some(0xD800..=0xDBFF) if matches!(hex_unit(json, at + 6), Some(0xDC00..=0xDFFF)) => 12,
        Some(_) => 6,
        None => 2,
    }
}

/// The UTF-16 code unit of a `\uXXXX` escape starting at `at`, if there is one.
fn hex_unit(json: &[u8], at: usize) -> Option<u16> {
    let escape = json.get(at..at + 6)?;
    if escape[0] != b'\\' || escape[1] != b'u' {
        return None;
    }
    if !escape[2..].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(&escape[2..]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn strip(text: &str) -> String {
        String::from_utf8(strip_unstorable(text.as_bytes()).into_owned()).expect("utf-8")
    }

    fn parsed(text: &str) -> Value {
        serde_json::from_str(&strip(text)).expect("clean text parses")
    }

    #[test]
    fn text_without_escapes_is_borrowed_unchanged() {
        let text = r#"{"a":"plain","b":[1,2,{"c":"ünïcode ✓"}]}"#;
        assert!(matches!(
            strip_unstorable(text.as_bytes()),
            Cow::Borrowed(_)
        ));
        assert!(is_storable(text.as_bytes()));
    }

    #[test]
    fn nul_is_removed_from_values_at_every_depth() {
        let text = r#"{"first_name":"Ada\u0000","m":{"a":[{"b":"x\u0000y\u0000"}],"c":"\u0000"}}"#;
        assert_eq!(
            parsed(text),
            json!({"first_name": "Ada", "m": {"a": [{"b": "xy"}], "c": ""}})
        );
        assert!(!is_storable(text.as_bytes()));
    }

    #[test]
    fn nul_is_removed_from_keys_at_every_depth() {
        let text = r#"{"k\u0000ey":{"in\u0000ner":[{"\u0000":1}]}}"#;
        assert_eq!(parsed(text), json!({"key": {"inner": [{"": 1}]}}));
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_text_and_kept() {
        // The JSON text "\\u0000" is a backslash followed by the letters u0000.
        let text = r#"{"a":"\\u0000","b":"\\\u0000","c":"\\\\u0000"}"#;
        assert_eq!(strip(text), r#"{"a":"\\u0000","b":"\\","c":"\\\\u0000"}"#);
        assert_eq!(
            parsed(text),
            json!({"a": "\\u0000", "b": "\\", "c": "\\\\u0000"})
        );
    }

    #[test]
    fn an_escaped_quote_does_not_end_the_string() {
        let text = r#"{"a":"say \"\u0000\" \u0000"}"#;
        assert_eq!(parsed(text), json!({"a": "say \"\" "}));
    }

    #[test]
    fn valid_surrogate_pairs_are_kept() {
        let text =
            r#"{"emoji":"\ud83d\ude00","upper":"\uD83D\uDE00","two":"\ud83d\ude00\ud83d\ude01"}"#;
        assert_eq!(strip(text), text);
        assert_eq!(
            parsed(text),
            json!({"emoji": "😀", "upper": "😀", "two": "😀😁"})
        );
    }

    #[test]
    fn lone_surrogates_are_removed() {
        // serde_json itself refuses them in a string; this is what made such events permanent.
        assert!(serde_json::from_str::<Value>(r#"{"a":"\ud800"}"#).is_err());
        let text = r#"{"high":"a\ud800b","low":"a\udc00b","high_end":"\udbff","twice":"\ud800\ud800","reversed":"\udc00\ud800","k\ud800":1}"#;
        assert_eq!(
            parsed(text),
            json!({"high": "ab", "low": "ab", "high_end": "", "twice": "", "reversed": "", "k": 1})
        );
    }

    #[test]
    fn a_lone_high_surrogate_before_a_valid_pair_leaves_the_pair() {
        let text = r#"{"a":"\ud800\ud83d\ude00"}"#;
        assert_eq!(parsed(text), json!({"a": "😀"}));
    }

    #[test]
    fn a_high_surrogate_followed_by_nul_loses_both() {
        let text = r#"{"a":"x\ud800\u0000y"}"#;
        assert_eq!(parsed(text), json!({"a": "xy"}));
    }

    #[test]
    fn other_escaped_control_characters_are_kept() {
        // Postgres stores every control character but NUL, escaped or not.
        let text = r#"{"a":"\u0001\u001f\t\n\r\b\f\/\u007f"}"#;
        assert_eq!(strip(text), text);
        assert_eq!(
            parsed(text),
            json!({"a": "\u{1}\u{1f}\t\n\r\u{8}\u{c}/\u{7f}"})
        );
    }

    #[test]
    fn raw_control_characters_are_left_for_the_parser_to_refuse() {
        // Not valid JSON inside a string: nothing to store, so nothing is changed and the
        // message stays what it was (the parser rejects it, and the dead letter keeps it).
        for text in ["{\"a\":\"x\0y\"}", "{\"a\":\"x\u{1}y\"}"] {
            assert_eq!(strip(text), text);
            assert!(serde_json::from_str::<Value>(&strip(text)).is_err());
        }
    }

    #[test]
    fn escapes_outside_strings_and_malformed_escapes_are_left_alone() {
        for text in [
            r#"\u0000{"a":1}"#,
            r#"{"a":"\u00"}"#,
            r#"{"a":"\u00zz"}"#,
            r#"{"a":"\"#,
        ] {
            assert_eq!(strip(text), text, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_taken_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            strip_unstorable(&bytes);
        }

        #[test]
        fn a_second_pass_changes_nothing(
            tokens in proptest::collection::vec(proptest::sample::select(vec![
                "\"", "\\", "\\\\", "\\u0000", "\\ud800", "\\uDBFF", "\\udc00",
                "\\ud83d", "\\ude00", "\\u0041", "\\u00", "u0000", "a", "é", "{", ":",
            ]), 0..24),
        ) {
            let text = tokens.concat();
            let once = strip_unstorable(text.as_bytes()).into_owned();
            proptest::prop_assert!(is_storable(&once), "{} -> {}", text, String::from_utf8_lossy(&once));
        }

        #[test]
        fn any_string_comes_back_without_its_nuls(text in ".*") {
            // serde_json writes NUL as `\u0000`, other control characters escaped too.
            let json = serde_json::to_string(&text).expect("serializes");
            let back: String = serde_json::from_slice(&strip_unstorable(json.as_bytes()))
                .expect("parses");
            proptest::prop_assert_eq!(back, text.replace('\0', ""));
        }
    }

    #[test]
    fn non_ascii_text_around_removed_escapes_is_kept() {
        let text = "{\"a\":\"é\\u0000✓\\ud800ü\"}";
        assert_eq!(parsed(text), json!({"a": "é✓ü"}));
    }
}
