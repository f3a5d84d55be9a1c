//! Clients nobody here wrote, through the gateway: LiteLLM as a library, LangChain, the
//! `llm` command line, the official OpenAI SDK for Node and the Vercel AI SDK, each on chat and on the
//! Responses API, streamed and not. Every usage figure a client parsed must equal the
//! ledger's entry for that request, and an invalid key must surface as the client's own
//! authentication error (the scripts check that part).

use crate::common::{target_dir, venv_python};
use crate::gateway::{Gateway, assert_totals_split, gateway_with};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The scenarios each script must report, in order: a script that stops early or skips
/// one fails here rather than passing on fewer checks.
const PYTHON: &[&str] = &[
    "litellm.completion",
    "litellm.responses",
    "langchain.chat",
    "langchain.responses",
    "langchain.responses.stream",
    "llm.cli",
];
const NODE: &[&str] = &[
    "node.responses",
    "node.responses.stream",
    "node.chat.stream",
    "vercel.generate",
    "vercel.stream",
];

fn here(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(file)
}

/// A directory under the build directory holding `tests/clients`'s Node packages at
/// the versions its lock file pins, installed once per lock file (under a file lock, as
/// the suite's PostgreSQL re-run may install beside it).
fn node_dir() -> PathBuf {
    let manifest = std::fs::read_to_string(here("package.json")).unwrap();
    let lock = std::fs::read_to_string(here("package-lock.json")).unwrap();
    let wanted = format!("{manifest}\n{lock}");
    let target = target_dir();
    let dir = target.join("clients-node");
    let stamp = dir.join("installed.txt");
    let guard = std::fs::File::create(target.join("clients-node.lock")).unwrap();
    guard.lock().unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("package.json"), &manifest).unwrap();
        std::fs::write(dir.join("package-lock.json"), &lock).unwrap();
        let ok = Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Node.js) for the client checks");
        assert!(ok.success(), "installing tests/clients/package.json failed");
        std::fs::write(&stamp, wanted).unwrap();
    }
    // ES modules resolve packages from the script's own directory.
    std::fs::copy(here("clients_check.mjs"), dir.join("clients_check.mjs")).unwrap();
    dir
}

/// Runs a client script and checks every call it reports against the ledger.
fn check(gw: &Gateway, mut cmd: Command, expected: &[&str]) {
    let out = cmd.arg(&gw.server.url).arg(&gw.key).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scenarios: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    let mut want = expected.to_vec();
    want.push("done");
    assert_eq!(scenarios, want, "{stdout}");
    for l in lines.iter().filter(|l| l["scenario"] != "done") {
        let scenario = l["scenario"].as_str().unwrap();
        let e = match l["request_id"].as_str() {
            Some(id) => gw.entry(id),
            // A client that shows no answer headers makes the script's last call.
            None => {
                assert_eq!(l["last"], true, "{scenario}: no request id");
                last_gateway_entry(gw)
            }
        };
        let u = &l["usage"];
        let n = |k: &str| e["tokens"][k].as_u64().unwrap_or(0);
        let (cached, reasoning) = (
            u["cached"].as_u64().unwrap(),
            u["reasoning"].as_u64().unwrap(),
        );
        assert_eq!(e["quality"]["status"], 200, "{scenario}: {e}");
        assert!(e["partial"].is_null(), "{scenario}: {e}");
        assert!(
            e["recount"]["flagged"].is_null(),
            "{scenario}: recount disagrees: {e}"
        );
        assert_totals_split(
            scenario,
            &e,
            u["input"].as_u64().unwrap(),
            u["output"].as_u64().unwrap(),
            cached,
            reasoning,
        );
        assert!(
            n("text.input") > 0 && n("text.output") > 0,
            "{scenario}: {e}"
        );
        if scenario.ends_with("stream") {
            assert_eq!(e["quality"]["stream"], true, "{scenario}: {e}");
            // The stream's scenarios ask a reasoning model: hidden tokens are billed.
            if scenario.contains("responses") || scenario == "vercel.stream" {
                assert!(reasoning > 0, "{scenario}: {e}");
            }
        }
    }
}

/// The newest gateway usage entry of the ledger.
fn last_gateway_entry(gw: &Gateway) -> Value {
    let (s, body) = gw
        .server
        .http("GET", "/api/v1/audit/entries?start=0", &gw.admin, None);
    assert_eq!(s, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|e| e["kind"] == "usage" && e["data"]["source"] == "gateway")
        .expect("a gateway entry")["data"]
        .clone()
}

#[test]
fn litellm_langchain_and_the_llm_cli_see_the_ledgers_usage() {
    let python = venv_python("clients-venv", "tests/clients/requirements.txt");
    let gw = gateway_with("", &[]);
    let mut cmd = Command::new(python);
    // LiteLLM otherwise fetches its price table from the network at import, and waits
    // on retries where there is none.
    cmd.env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .arg(here("clients_check.py"));
    check(&gw, cmd, PYTHON);
}

#[test]
fn node_openai_and_the_vercel_ai_sdk_see_the_ledgers_usage() {
    let dir = node_dir();
    let gw = gateway_with("", &[]);
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir).arg("clients_check.mjs");
    check(&gw, cmd, NODE);
}
