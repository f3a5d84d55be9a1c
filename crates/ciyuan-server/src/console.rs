//! The web console: static files embedded in the binary and served at `/console/`.
//!
//! No front-end build step: plain ES modules and CSS under `crates/ciyuan-server/console/`,
//! included with `include_bytes!`, and uPlot vendored as its release file (see
//! `console/VENDORED.md`, whose hashes a test checks). The pages talk only to `/api/v1`,
//! as the CLI does, signed in by a session (`sessions.rs`). Every answer carries a
//! strict Content-Security-Policy (scripts and styles from this origin only, no inline
//! script, no framing), `nosniff`, and `no-cache` (the files change with the binary,
//! under the same names).

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::extract::PathParam;

/// The policy every console answer carries. `style-src` allows only files of this
/// origin; uPlot sizes its elements through the CSSOM, which the policy does not govern.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    bytes: &'static [u8],
    content_type: &'static str,
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            bytes: include_bytes!(concat!("../console/", $path)),
            content_type: $type,
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file the console serves.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("i18n.js", JS),
    asset!("pages.js", JS),
    asset!("proof.js", JS),
    asset!("time.js", JS),
    asset!("style.css", CSS),
    asset!("vendor/uPlot.iife.min.js", JS),
    asset!("vendor/uPlot.min.css", CSS),
];

fn answer(asset: &Asset) -> Response {
    let mut resp = (StatusCode::OK, asset.bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    secure_headers(h);
    resp
}

/// The headers every console answer carries.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated each time: the names stay while the binary changes them.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// `GET /console` and `/console/`: the page.
pub async fn index() -> Result<Response, ApiError> {
    find("index.html")
        .map(answer)
        .ok_or_else(|| ApiError::internal("the console's index.html is not embedded"))
}

/// `GET /console/{file}`: one of the console's files. Any other path within the
/// console is the page itself (the console's own routes live after `#`).
pub async fn asset(PathParam(file): PathParam) -> Result<Response, ApiError> {
    match find(&file) {
        Some(a) => Ok(answer(a)),
        None => Err(ApiError::not_found(format!(
            "the console has no file {file}"
        ))),
    }
}

/// `GET /`: browsers (asking for HTML) are sent to the console; API clients get the
/// usual problem.
pub async fn root(headers: HeaderMap) -> Response {
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if html {
        let mut resp = StatusCode::SEE_OTHER.into_response();
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/console/"));
        resp
    } else {
        ApiError::not_found("no route for /: the API is under /api/v1/, the console at /console/")
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Every vendored file is byte for byte the release named in VENDORED.md.
    #[test]
    fn vendored_files_match_their_recorded_hashes() {
        let listed = include_str!("../console/VENDORED.md");
        let mut checked = 0;
        for line in listed.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | file | package | version | licence | sha256 |
            if cells.len() < 6 || !cells[1].starts_with('`') {
                continue;
            }
            let file = cells[1].trim_matches('`');
            let want = cells[5].trim_matches('`');
            let asset = find(file).unwrap_or_else(|| panic!("{file} is listed but not served"));
            assert_eq!(
                hex::encode(Sha256::digest(asset.bytes)),
                want,
                "{file} differs from the vendored release"
            );
            checked += 1;
        }
        let vendored = ASSETS
            .iter()
            .filter(|a| a.path.starts_with("vendor/"))
            .count();
        assert_eq!(
            checked, vendored,
            "every vendored file is listed with its hash"
        );
    }

    #[test]
    fn no_page_runs_inline_script() {
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".html")) {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for tag in text.split("<script").skip(1) {
                let head = tag.split('>').next().unwrap();
                assert!(head.contains("src="), "{}: inline <script>", a.path);
            }
            assert!(!text.contains(" onclick="), "{}: inline handler", a.path);
            assert!(!text.contains("style=\""), "{}: inline style", a.path);
        }
    }
}
