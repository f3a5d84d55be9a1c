//! The web console in a real browser: Debian's headless Chromium, driven by Selenium
//! from a Python script (`tests/console/console_check.py`), against a real
//! `ciyuan serve`. The test installs what it needs itself: Chromium and its driver with
//! apt-get when they are missing, Selenium into a virtual environment under the target
//! directory. It fails, never skips, when it cannot. Screenshots of every page are kept
//! under the target directory's `console-screenshots/<backend>/`.

use crate::common::{Backend, Server, backend, http, json, target_dir};
use std::path::Path;
use std::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// A font with Chinese glyphs, so the zh-CN screenshots show text rather than boxes.
const CJK_FONT: &str = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc";

/// Installs Debian's Chromium, its driver and a CJK font when missing; fails loudly
/// with apt-get's reason when it cannot.
fn chromium() {
    // The suite's PostgreSQL run starts beside this one: one install at a time.
    let lock = std::fs::File::create(target_dir().join("console-apt.lock")).unwrap();
    lock.lock().expect("locking the Chromium install");
    let missing: Vec<&str> = [
        (CHROMIUM, "chromium"),
        (CHROMEDRIVER, "chromium-driver"),
        (CJK_FONT, "fonts-wqy-zenhei"),
    ]
    .into_iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return;
    }
    let out = Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| {
            panic!("the console test needs {missing:?} and cannot run apt-get: {e}")
        });
    assert!(
        out.status.success(),
        "the console test needs {missing:?}; apt-get install failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        "apt-get installed {missing:?} but {CHROMIUM} or {CHROMEDRIVER} is still missing"
    );
}

#[test]
fn the_console_in_a_browser_for_every_role() {
    chromium();
    let python = crate::common::venv_python("console-venv", "tests/console/requirements.txt");
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every second: the audit page proves entries made moments before.
    let server = Server::start_with(dir.path(), &["--checkpoint-interval-secs", "1"]);
    let admin = server.bootstrap.clone().expect("a bootstrap admin key");
    let shots = target_dir()
        .join("console-screenshots")
        .join(match backend() {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        });
    if shots.exists() {
        std::fs::remove_dir_all(&shots).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&server.url)
        .arg(&admin)
        .arg(&shots)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("console check passed"),
        "the browser check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the browser did is in the server, seen through the API with the admin key.
    let (s, body) = http(&server.url, "GET", "/api/v1/budgets/acme/cn", &admin, None);
    assert_eq!(s, 200);
    let limits = json(&body)["limits"].clone();
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["amount"] == 1_000_000 && l["mode"] == "hard"),
        "{limits}"
    );
    let (s, body) = http(
        &server.url,
        "GET",
        "/api/v1/keys?account=acme/cn",
        &admin,
        None,
    );
    assert_eq!(s, 200);
    let keys = json(&body)["keys"].clone();
    assert_eq!(
        keys.as_array()
            .unwrap()
            .iter()
            .filter(|k| k["revoked_at"].is_string())
            .count(),
        1,
        "the owner revoked one key in the console: {keys}"
    );
    for page in [
        "admin-overview",
        "admin-overview-zh",
        "admin-accounts",
        "admin-usage",
        "admin-keys",
        "admin-budgets",
        "admin-statements",
        "admin-quality",
        "admin-audit",
        "owner-overview",
        "owner-keys",
        "reader-overview",
        "reader-budgets",
        "auditor-audit",
    ] {
        let png = shots.join(format!("{page}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is no PNG", png.display());
    }
}
