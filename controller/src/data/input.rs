//! A `lines` job's input by reference: `"split": {"lines": {"input":
//! {"data": "<id>"}, "block": N}}` (in a TOML job file `input = { data =
//! "<id>" }`), where `<id>` is a complete upload (`sparegrid upload`).
//!
//! [`resolve_body`] runs at submit when the request does not parse
//! because `split.lines.input` is not a string: it reads the upload
//! (verified against its blake3 again while reading), puts its text in
//! place of the reference and hands back the body, which then goes
//! through the same parsing, validation and split as inline input. The
//! job's stored request therefore holds the input itself: the upload may
//! be removed afterwards, and `job_limits.max_input_bytes` still caps it.
//! Errors name the field `split.lines.input.data`.

use std::io::Read;

use serde_json::Value;

use super::DataPlane;
use crate::job::{ErrorCode, Limits, ValidationError};

/// The field a reference's errors name.
pub const FIELD: &str = "split.lines.input.data";

/// The data id `body` references as its `lines` input, if it does so
/// (`split.lines.input` is an object); an error naming the field when
/// the reference itself is malformed.
pub fn reference(body: &Value) -> Result<Option<String>, ValidationError> {
    let Some(input) = body.pointer("/split/lines/input") else {
        return Ok(None);
    };
    let Some(obj) = input.as_object() else {
        return Ok(None);
    };
    if let Some(k) = obj.keys().find(|k| k.as_str() != "data") {
        return Err(ValidationError::new(
            ErrorCode::UnknownField,
            format!("split.lines.input.{k}"),
            "an input reference has one field, `data` (the upload's id)",
        ));
    }
    match obj.get("data") {
        None => Err(ValidationError::new(
            ErrorCode::MissingField,
            FIELD,
            "an input reference needs `data`, the id `sparegrid upload` printed",
        )),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(_) => Err(ValidationError::new(
            ErrorCode::InvalidType,
            FIELD,
            "expected a string: the id `sparegrid upload` printed",
        )),
    }
}

/// Resolves the input reference in the JSON `body`, if any: `Ok(None)`
/// when there is none (the body stands as it is), else the body with the
/// upload's text inline. Blocking (reads the file).
pub fn resolve_body(
    body: &[u8],
    data: Option<&DataPlane>,
    limits: &Limits,
) -> Result<Option<Vec<u8>>, ValidationError> {
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let Some(id) = reference(&value)? else {
        return Ok(None);
    };
    let Some(data) = data else {
        return Err(invalid(
            "this controller keeps no job data ([data] enabled = false); send the input inline"
                .to_owned(),
        ));
    };
    let text = data.read_input(&id, limits.max_input_bytes)?;
    if let Some(slot) = value.pointer_mut("/split/lines/input") {
        *slot = Value::String(text);
    }
    serde_json::to_vec(&value)
        .map(Some)
        .map_err(|e| invalid(format!("cannot rebuild the request: {e}")))
}

fn invalid(message: String) -> ValidationError {
    ValidationError::new(ErrorCode::InvalidField, FIELD, message)
}

impl DataPlane {
    /// The text of complete upload `id` for a `lines` input of at most
    /// `max_bytes`: read whole and checked against its blake3. Unknown,
    /// unfinished, too large or not UTF-8 is an error naming
    /// `split.lines.input.data`. Blocking.
    pub fn read_input(&self, id: &str, max_bytes: u64) -> Result<String, ValidationError> {
        use sparegrid_transfer::StoreError as E;
        let store = self.transfer().store();
        let complete = match store.open_complete(id) {
            Ok(c) => c,
            Err(E::BadId(_)) => {
                return Err(invalid(format!(
                    "{id:?} is not a data id (ids are letters, digits, `_` and `-`)"
                )))
            }
            Err(E::NotFound { .. }) => {
                return Err(invalid(format!(
                    "no upload has id {id:?} (upload the file with `sparegrid upload FILE`)"
                )))
            }
            Err(E::Incomplete { .. }) => {
                // Read-only: the partial file's length and the journal's size.
                let have = store
                    .partial_path(id)
                    .ok()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len());
                let size = store
                    .journal_path(id)
                    .ok()
                    .and_then(|p| sparegrid_transfer::journal::read_header(&p).ok())
                    .map(|h| h.size);
                let offset = match (have, size) {
                    (Some(h), Some(s)) => format!(": {h} of {s} bytes are there"),
                    _ => String::new(),
                };
                return Err(invalid(format!(
                    "upload {id} is not complete{offset}; finish it (run `sparegrid upload` again) before submitting"
                )));
            }
            Err(e) => return Err(invalid(format!("upload {id} cannot be read: {e}"))),
        };
        if complete.size > max_bytes {
            return Err(ValidationError::new(
                ErrorCode::TooLarge,
                FIELD,
                format!(
                    "upload {id} is {} bytes; the input limit is {max_bytes} (job_limits.max_input_bytes)",
                    complete.size
                ),
            ));
        }
        if complete.size == 0 {
            return Err(invalid(format!(
                "upload {id} is empty; there is nothing to run"
            )));
        }
        let mut bytes = Vec::with_capacity(complete.size as usize);
        let mut file = &complete.file;
        file.read_to_end(&mut bytes)
            .map_err(|e| invalid(format!("upload {id} cannot be read: {e}")))?;
        let digest = blake3::hash(&bytes).to_hex().to_string();
        if bytes.len() as u64 != complete.size || digest != complete.digest {
            tracing::warn!(id, "a complete upload no longer matches its digest");
            return Err(invalid(format!(
                "upload {id} no longer matches its blake3 digest (damaged on disk); upload it again"
            )));
        }
        String::from_utf8(bytes).map_err(|e| {
            invalid(format!(
                "upload {id} is not UTF-8 text (first bad byte at offset {}); `lines` input is text",
                e.utf8_error().valid_up_to()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::plane;
    use crate::job;

    fn body(input: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "command": {"argv": ["wc", "-l"]},
            "split": {"lines": {"input": input, "block": 2}},
        }))
        .unwrap()
    }

    #[test]
    fn a_reference_becomes_the_uploads_text_and_splits_like_inline_input() {
        let t = tempfile::tempdir().unwrap();
        let p = plane(t.path());
        let text = "a\r\nb\nc\nd\ne";
        p.publish("in-x", "t".into(), text.as_bytes()).unwrap();
        let limits = Limits::default();
        let resolved = resolve_body(
            &body(serde_json::json!({"data": "in-x"})),
            Some(&p),
            &limits,
        )
        .unwrap()
        .unwrap();
        let by_ref = job::parse_json(&resolved).unwrap();
        let inline = job::parse_json(&body(Value::String(text.into()))).unwrap();
        assert_eq!(by_ref, inline);
        let subs = crate::split::split(&by_ref).unwrap();
        let joined: Vec<u8> = subs.iter().flat_map(|s| s.stdin.clone()).collect();
        assert_eq!(joined, text.as_bytes());
        assert_eq!(subs.len(), 3);
        // Inline input is left alone.
        assert_eq!(
            resolve_body(&body(Value::String("x".into())), Some(&p), &limits).unwrap(),
            None
        );
    }

    #[test]
    fn bad_references_name_the_field() {
        let t = tempfile::tempdir().unwrap();
        let p = plane(t.path());
        p.publish("in-bin", "t".into(), b"ok\n\xff\n").unwrap();
        p.publish("in-big", "t".into(), b"0123456789\n").unwrap();
        let small = Limits {
            max_input_bytes: 5,
            ..Limits::default()
        };
        let limits = Limits::default();
        // An upload created but not finished.
        let store = p.transfer().store();
        let mut up = store
            .create(sparegrid_transfer::journal::Header {
                id: "in-half".into(),
                source: "t".into(),
                target: "t".into(),
                size: 10,
                digest: blake3::hash(b"0123456789").to_hex().to_string(),
                checkpoint_bytes: 0,
                created_unix: 0,
                expires_unix: u64::MAX,
                metadata: String::new(),
            })
            .unwrap();
        let mut req = up.begin(0, None).unwrap();
        up.write(&mut req, b"01234").unwrap();
        up.finish(req).unwrap();
        drop(up);
        let cases: Vec<(Value, &Limits, ErrorCode, &str, &str)> = vec![
            (
                serde_json::json!({"data": "in-nope"}),
                &limits,
                ErrorCode::InvalidField,
                FIELD,
                "no upload",
            ),
            (
                serde_json::json!({"data": "in-half"}),
                &limits,
                ErrorCode::InvalidField,
                FIELD,
                "5 of 10 bytes",
            ),
            (
                serde_json::json!({"data": "../etc/passwd"}),
                &limits,
                ErrorCode::InvalidField,
                FIELD,
                "not a data id",
            ),
            (
                serde_json::json!({"data": "in-bin"}),
                &limits,
                ErrorCode::InvalidField,
                FIELD,
                "offset 3",
            ),
            (
                serde_json::json!({"data": "in-big"}),
                &small,
                ErrorCode::TooLarge,
                FIELD,
                "limit is 5",
            ),
            (
                serde_json::json!({"data": 7}),
                &limits,
                ErrorCode::InvalidType,
                FIELD,
                "string",
            ),
            (
                serde_json::json!({}),
                &limits,
                ErrorCode::MissingField,
                FIELD,
                "needs `data`",
            ),
            (
                serde_json::json!({"data": "in-x", "path": "/x"}),
                &limits,
                ErrorCode::UnknownField,
                "split.lines.input.path",
                "one field",
            ),
        ];
        for (input, l, code, field, msg) in cases {
            let e = resolve_body(&body(input.clone()), Some(&p), l).unwrap_err();
            assert_eq!((e.code, e.field.as_str()), (code, field), "{input}: {e:?}");
            assert!(e.message.contains(msg), "{input}: {}", e.message);
        }
        let e =
            resolve_body(&body(serde_json::json!({"data": "in-big"})), None, &limits).unwrap_err();
        assert_eq!(e.field, FIELD);
        assert!(e.message.contains("enabled = false"), "{}", e.message);
    }
}
