//! Attribution tags of a gateway request: `x-ciyuan-tags: feature=search,team=hr` and
//! OpenAI's `metadata` object, merged and bounded (`ciyuan_core::check_tags`) before
//! the request is admitted, so a request whose tags cannot be recorded whole is
//! refused rather than recorded with some of them cut.

use super::protocol::GatewayError;
use axum::http::{HeaderMap, StatusCode};
use std::collections::BTreeMap;

/// The header naming a request's tags.
pub(crate) const HEADER: &str = "x-ciyuan-tags";

/// The request's tags: the header's (every line of it) and then `metadata`'s. A key
/// given twice with different values, a malformed pair or a tag past the bounds is a
/// 400 naming it.
pub(crate) fn of(
    headers: &HeaderMap,
    metadata: &[(String, String)],
) -> Result<BTreeMap<String, String>, GatewayError> {
    let bad = |param: &'static str, m: String| {
        GatewayError::new(StatusCode::BAD_REQUEST, format!("{param}: {m}")).param(param)
    };
    let mut tags = BTreeMap::new();
    let mut put = |param: &'static str, k: &str, v: &str| match tags.get(k) {
        Some(old) if old != v => Err(bad(
            param,
            format!("tag {k:?} is given twice, as {old:?} and {v:?}"),
        )),
        Some(_) => Ok(()),
        None => {
            tags.insert(k.to_string(), v.to_string());
            Ok(())
        }
    };
    for line in headers.get_all(HEADER) {
        let line = std::str::from_utf8(line.as_bytes())
            .map_err(|_| bad(HEADER, "must be UTF-8".into()))?;
        for pair in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(bad(
                    HEADER,
                    format!("{pair:?} is not key=value (e.g. feature=search,team=hr)"),
                ));
            };
            put(HEADER, k.trim(), v.trim())?;
        }
    }
    for (k, v) in metadata {
        put("metadata", k, v)?;
    }
    ciyuan_core::check_tags(&tags).map_err(|e| bad(HEADER_OR_METADATA, e.0))?;
    Ok(tags)
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
        assert_eq!(t, want);
        assert!(of(&HeaderMap::new(), &[]).unwrap().is_empty());
        // A value may hold '=' (only the first splits).
        assert_eq!(of(&headers(&["q=a=b"]), &[]).unwrap()["q"], "a=b");
    }

    #[test]
    fn what_cannot_be_recorded_whole_is_refused_by_name() {
        let e = |h: &[&str], m: &[(&str, &str)]| message(of(&headers(h), &meta(m)).unwrap_err());
        assert_eq!(
            e(&["feature"], &[]),
            "x-ciyuan-tags: \"feature\" is not key=value (e.g. feature=search,team=hr)"
        );
        assert_eq!(
            e(&["team=hr"], &[("team", "ops")]),
            "metadata: tag \"team\" is given twice, as \"hr\" and \"ops\""
        );
        assert!(e(&["Team=hr"], &[]).contains("lowercase letters"));
        assert!(e(&[&format!("k={}", "v".repeat(257))], &[]).contains("1 to 256 bytes"));
        let many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            e(&[&many.join(",")], &[]),
            "tags: 17 tags; at most 16 are recorded"
        );
        assert!(e(&["k="], &[]).contains("1 to 256 bytes"));
    }
}
