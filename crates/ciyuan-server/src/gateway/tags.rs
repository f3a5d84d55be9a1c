//! Attribution tags of a gateway request: `x-ciyuan-tags: feature=search,team=hr` and
//! OpenAI's `metadata` object, merged and bounded (`ciyuan_core::check_tags`) before
//! the request is admitted.
//!
//! The header is Ciyuan's own: tags there that cannot be recorded whole are refused
//! rather than recorded with some of them cut. `metadata` is OpenAI's, with OpenAI's
//! rules (any key of up to 64 characters, values of up to 512): refusing what OpenAI
//! accepts would break clients that use it for their own purposes, so its pairs that
//! fit the tags' rules are recorded, and the others are sent on unchanged but not
//! recorded, named in the answer's [`SKIPPED_HEADER`].

use super::protocol::GatewayError;
use axum::http::{HeaderMap, StatusCode};
use std::collections::BTreeMap;

/// The header naming a request's tags.
pub(crate) const HEADER: &str = "x-ciyuan-tags";

/// The answer's header naming the `metadata` keys not recorded as tags.
pub(crate) const SKIPPED_HEADER: &str = "x-ciyuan-tags-skipped";

/// A request's tags, and the `metadata` keys left out of them.
#[derive(Debug, Default)]
pub(crate) struct Tags {
    /// What the entry records.
    pub(crate) tags: BTreeMap<String, String>,
    /// `metadata` keys not recorded: not of the tags' form, past their bounds, or
    /// given by the header with another value.
    pub(crate) skipped: Vec<String>,
}

/// The request's tags: the header's (every line of it), then those of `metadata`'s
/// pairs that fit. In the header, a key given twice with different values, a
/// malformed pair or a tag past the bounds is a 400 naming it.
pub(crate) fn of(headers: &HeaderMap, metadata: &[(String, String)]) -> Result<Tags, GatewayError> {
    let bad = |param: &'static str, m: String| {
        GatewayError::new(StatusCode::BAD_REQUEST, format!("{param}: {m}")).param(param)
    };
    // Every line of the header, read as one list.
    let mut lines = Vec::new();
    for line in headers.get_all(HEADER) {
        lines.push(
            std::str::from_utf8(line.as_bytes())
                .map_err(|_| bad(HEADER, "must be UTF-8".into()))?,
        );
    }
    let joined;
    let list = match lines.as_slice() {
        [one] => *one,
        _ => {
            joined = lines.join(",");
            &joined
        }
    };
    let mut tags = ciyuan_core::read_tag_list(list).map_err(|e| bad(HEADER, e.0))?;
    ciyuan_core::check_tags(&tags).map_err(|e| bad(HEADER_OR_METADATA, e.0))?;
    let mut skipped = Vec::new();
    for (k, v) in metadata {
        let fits = match tags.get(k) {
            Some(have) => have == v,
            None => tags.len() < ciyuan_core::MAX_TAGS && ciyuan_core::check_tag(k, v).is_ok(),
        };
        if fits {
            tags.insert(k.clone(), v.clone());
        } else {
            skipped.push(k.clone());
        }
    }
    Ok(Tags { tags, skipped })
}

/// `keys` as one header value: comma-separated, each byte that a header cannot carry
/// as it is (not visible ASCII), a comma or `%` percent-encoded.
pub(crate) fn header_list(keys: &[String]) -> String {
    let mut out = String::new();
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for b in k.bytes() {
            if b.is_ascii_graphic() && b != b',' && b != b'%' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Where a bound's tags came from, when they may have come from both.
const HEADER_OR_METADATA: &str = "tags";

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(HEADER, l.parse().unwrap());
        }
        h
    }

    fn meta(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn message(e: GatewayError) -> String {
        e.message
    }

    #[test]
    fn header_and_metadata_merge_into_one_bounded_set() {
        let t = of(
            &headers(&["feature=search, team=hr", "region = cn"]),
            &meta(&[("team", "hr"), ("experiment", "b")]),
        )
        .unwrap();
        let want: BTreeMap<String, String> = [
            ("experiment", "b"),
            ("feature", "search"),
            ("region", "cn"),
            ("team", "hr"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(t.tags, want);
        assert!(t.skipped.is_empty());
        assert!(of(&HeaderMap::new(), &[]).unwrap().tags.is_empty());
        // A value may hold '=' (only the first splits).
        assert_eq!(of(&headers(&["q=a=b"]), &[]).unwrap().tags["q"], "a=b");
    }

    #[test]
    fn what_the_header_cannot_record_whole_is_refused_by_name() {
        let e = |h: &[&str]| message(of(&headers(h), &[]).unwrap_err());
        assert_eq!(
            e(&["feature"]),
            "x-ciyuan-tags: \"feature\" is not key=value (e.g. feature=search,team=hr)"
        );
        assert_eq!(
            e(&["team=hr", "team=ops"]),
            "x-ciyuan-tags: tag \"team\" is given twice, as \"hr\" and \"ops\""
        );
        assert!(e(&["Team=hr"]).contains("lowercase letters"));
        assert!(e(&[&format!("k={}", "v".repeat(257))]).contains("1 to 256 bytes"));
        let many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            e(&[&many.join(",")]),
            "tags: 17 tags; at most 16 are recorded"
        );
        assert!(e(&["k="]).contains("1 to 256 bytes"));
    }

    /// OpenAI accepts metadata the tags' rules do not: such pairs are not recorded,
    /// and named, never a refusal.
    #[test]
    fn metadata_that_does_not_fit_is_skipped_and_named() {
        let long = "v".repeat(300);
        let t = of(
            &headers(&["team=hr"]),
            &meta(&[
                ("userId", "u-1"),
                ("team", "ops"),
                ("team", "hr"),
                ("note", &long),
                ("feature", "search"),
            ]),
        )
        .unwrap();
        assert_eq!(
            t.tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["feature=search", "team=hr"]
        );
        assert_eq!(t.skipped, ["userId", "team", "note"]);
        assert_eq!(
            header_list(&["userId".into(), "用户, id%".into()]),
            "userId,%E7%94%A8%E6%88%B7%2C%20id%25"
        );
        // Past 16 tags, the header's first.
        let header: Vec<String> = (0..15).map(|i| format!("k{i}=v")).collect();
        let t = of(
            &headers(&[&header.join(",")]),
            &meta(&[("a", "1"), ("b", "2")]),
        )
        .unwrap();
        assert_eq!(t.tags.len(), 16);
        assert_eq!(t.skipped, ["b"]);
    }
}
