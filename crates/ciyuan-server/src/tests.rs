//! Handler tests through the router, with an in-memory log and SQLite store.

use super::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use ciyuan_store::{AppendDone, CheckpointDone, LogError, SignedCheckpoint};
use ciyuan_tlog::{Checkpoint, Hash, MemoryTree, NoteSigner};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Mutex;
use tower::ServiceExt;

mod audit;
mod service_levels;
mod sessions;

/// A log kept in memory: the same contract as the file ledger, for handler tests.
pub(crate) struct MemLog {
    inner: Mutex<(Vec<Vec<u8>>, MemoryTree, Vec<SignedCheckpoint>)>,
    signer: NoteSigner,
    /// Set to play a log whose storage is out of reach (`Log::available`).
    down: std::sync::atomic::AtomicBool,
}

impl MemLog {
    pub(crate) fn new() -> MemLog {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        MemLog {
            inner: Mutex::new((Vec::new(), MemoryTree::new(), Vec::new())),
            signer: NoteSigner::new("test.ciyuan/log", key).unwrap(),
            down: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Log for MemLog {
    fn append(&self, entries: Vec<Vec<u8>>, done: AppendDone) -> Result<(), LogError> {
        let mut g = self.inner.lock().unwrap();
        let start = g.0.len() as u64;
        for e in entries {
            g.1.push(ciyuan_tlog::leaf_hash(&e));
            g.0.push(e);
        }
        let end = g.0.len() as u64;
        drop(g);
        done(Ok(start..end));
        Ok(())
    }
    fn checkpoint(&self, done: CheckpointDone) -> Result<(), LogError> {
        let mut g = self.inner.lock().unwrap();
        let cp = Checkpoint {
            origin: "test.ciyuan/log".into(),
            size: g.0.len() as u64,
            root: g.1.root(),
            extensions: vec![],
        };
        let note = self.signer.sign(&cp.to_text()).unwrap();
        let signed = SignedCheckpoint {
            checkpoint: cp,
            note,
        };
        g.2.push(signed.clone());
        drop(g);
        done(Ok(signed));
        Ok(())
    }
    fn size(&self) -> u64 {
        self.inner.lock().unwrap().0.len() as u64
    }
    fn entry(&self, index: u64) -> Result<Vec<u8>, LogError> {
        let g = self.inner.lock().unwrap();
        g.0.get(index as usize)
            .cloned()
            .ok_or_else(|| LogError::Invalid("no entry".into()))
    }
    fn scan(
        &self,
        range: std::ops::Range<u64>,
        f: &mut ciyuan_store::ScanFn<'_>,
    ) -> Result<(), LogError> {
        let entries: Vec<Vec<u8>> =
            self.inner.lock().unwrap().0[range.start as usize..range.end as usize].to_vec();
        for (i, e) in entries.iter().enumerate() {
            f(range.start + i as u64, e)?;
        }
        Ok(())
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        let g = self.inner.lock().unwrap();
        ciyuan_tlog::inclusion_proof(&g.1, index, size)
            .map_err(|e| LogError::Invalid(format!("{e:?}")))
    }
    fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LogError> {
        let g = self.inner.lock().unwrap();
        ciyuan_tlog::consistency_proof(&g.1, old, new)
            .map_err(|e| LogError::Invalid(format!("{e:?}")))
    }
    fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        let g = self.inner.lock().unwrap();
        ciyuan_tlog::root(&g.1, size).map_err(|e| LogError::Invalid(format!("{e:?}")))
    }
    fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        self.inner.lock().unwrap().2.last().cloned()
    }
    fn checkpoint_count(&self) -> u64 {
        self.inner.lock().unwrap().2.len() as u64
    }
    fn checkpoints(&self, from: u64, limit: usize) -> Result<Vec<SignedCheckpoint>, LogError> {
        let g = self.inner.lock().unwrap();
        Ok(g.2
            .iter()
            .skip(from as usize)
            .take(limit)
            .cloned()
            .collect())
    }
    fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }
    fn available(&self) -> Result<(), LogError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LogError::Unavailable("the database is restarting".into()));
        }
        Ok(())
    }
}

struct Harness {
    router: Router,
    admin: String,
    app: Arc<App>,
}

async fn harness() -> Harness {
    let store: Arc<dyn Store> =
        Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
    let log: Arc<dyn Log> = Arc::new(MemLog::new());
    harness_on(store, log, None).await
}

/// A server on `store` and `log`; `admin` is the admin key of an earlier server on
/// them (a restart), else one is bootstrapped.
async fn harness_on(store: Arc<dyn Store>, log: Arc<dyn Log>, admin: Option<String>) -> Harness {
    let definitions: Vec<ciyuan_measure::RawDefinition> = serde_json::from_value(json!([
        {"service": "doc.verify", "version": 1, "effective_from": "2020-01-01T00:00:00Z", "tokens": {"other.input": "5 + 2 * pages"}},
        {"service": "face.match", "version": 1, "effective_from": "2020-01-01T00:00:00Z", "tokens": {"other.input": "1"}},
    ]))
    .unwrap();
    let config = ServerConfig {
        max_body_bytes: 4096,
        definitions,
        ..ServerConfig::default()
    };
    let app = App::new(store, log, config).unwrap();
    let admin = match admin {
        Some(admin) => admin,
        None => app.bootstrap_admin_key(None).await.unwrap().unwrap(),
    };
    assert!(
        app.bootstrap_admin_key(None).await.unwrap().is_none(),
        "bootstrap happens once"
    );
    Harness {
        router: router(app.clone()),
        admin,
        app,
    }
}

impl Harness {
    async fn send(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let is_problem = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        if status.is_client_error() || status.is_server_error() {
            assert!(
                is_problem,
                "{status} without problem+json: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, v)
    }

    async fn admin(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let b = body.map(|b| b.to_string());
        self.send(method, uri, Some(&self.admin.clone()), b.as_deref())
            .await
    }

    async fn key(&self, account: &str, scopes: &[&str]) -> String {
        let (s, v) = self
            .admin(
                "POST",
                "/api/v1/keys",
                Some(json!({"account": account, "scopes": scopes})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["key"].as_str().unwrap().to_string()
    }
}

#[tokio::test]
async fn accounts_are_created_with_their_parents() {
    let h = harness().await;
    let (s, v) = h
        .admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn/hr", "time_zone": "Asia/Shanghai", "metadata": {"gl": "6001"}})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["path"], "acme/cn/hr");
    assert_eq!(v["metadata"]["gl"], "6001");
    let (s, v) = h.admin("GET", "/api/v1/accounts/acme/cn", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = h.admin("GET", "/api/v1/accounts?under=acme", None).await;
    assert_eq!(s, StatusCode::OK);
    let paths: Vec<&str> = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["acme", "acme/cn", "acme/cn/hr"]);
    let (s, v) = h
        .admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn"})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = h
        .admin(
            "PATCH",
            "/api/v1/accounts/acme/cn",
            Some(json!({"display_name": "China"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["display_name"], "China");
    let (s, _) = h.admin("GET", "/api/v1/accounts/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_gets_clear_4xx() {
    let h = harness().await;
    let k = h.admin.clone();
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": "),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": \"a\", \"colour\": 1}"),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": \"a//b\"}"),
            StatusCode::BAD_REQUEST,
            "empty segment",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": \"../x\"}"),
            StatusCode::BAD_REQUEST,
            "\"..\" is not allowed",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": 5}"),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some(&k),
            Some("{\"path\": \"a\", \"time_zone\": \"Mars/Olympus\"}"),
            StatusCode::BAD_REQUEST,
            "not an IANA time zone",
        ),
        (
            "POST",
            "/api/v1/accounts",
            None,
            Some("{\"path\": \"a\"}"),
            StatusCode::UNAUTHORIZED,
            "missing API key",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some("cy_nonsense"),
            Some("{\"path\": \"a\"}"),
            StatusCode::UNAUTHORIZED,
            "not a Ciyuan key",
        ),
        (
            "POST",
            "/api/v1/keys",
            Some(&k),
            Some("{\"account\": \"/\", \"scopes\": [\"root\"]}"),
            StatusCode::BAD_REQUEST,
            "unknown scope \"root\"",
        ),
        (
            "POST",
            "/api/v1/keys",
            Some(&k),
            Some("{\"account\": \"ghost\", \"scopes\": [\"read\"]}"),
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/usage?bucket=week",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "bucket \"week\"",
        ),
        (
            "GET",
            "/api/v1/usage?from=yesterday",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "RFC 3339",
        ),
        (
            "GET",
            "/api/v1/usage?colour=red",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "GET",
            "/api/v1/audit/entries/abc/proof",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "not a number",
        ),
        (
            "GET",
            "/api/v1/audit/entries/999/proof",
            Some(&k),
            None,
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "GET",
            "/api/v1/accounts/a//b",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "empty segment",
        ),
        (
            "GET",
            "/api/v1/accounts/../x",
            Some(&k),
            None,
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "PATCH",
            "/api/v1/accounts/a",
            Some(&k),
            Some("{\"colour\": 1}"),
            StatusCode::BAD_REQUEST,
            "unknown field `colour`",
        ),
        (
            "DELETE",
            "/api/v1/keys/000000000000",
            Some(&k),
            None,
            StatusCode::NOT_FOUND,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/adjustments",
            Some(&k),
            Some(
                "{\"account\": \"a\", \"reason\": \"r\", \"service\": \"s\", \"tokens\": {\"text.input\": 1.5}}",
            ),
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            "POST",
            "/api/v1/adjustments",
            Some(&k),
            Some(
                "{\"account\": \"a\", \"reason\": \"r\", \"service\": \"s\", \"tokens\": {\"text.input\": 99999999999999999999}}",
            ),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "GET",
            "/api/v1/nowhere",
            Some(&k),
            None,
            StatusCode::NOT_FOUND,
            "no route",
        ),
        (
            "PUT",
            "/api/v1/accounts",
            Some(&k),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
    ];
    for (method, uri, key, body, status, needle) in cases {
        let (s, v) = h.send(method, uri, key, body).await;
        assert_eq!(s, status, "{method} {uri} {body:?}: {v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{method} {uri}: {v} lacks {needle}"
        );
    }
    // Oversize body and wrong media type.
    let big = format!("{{\"path\": \"{}\"}}", "a".repeat(5000));
    let (s, _) = h
        .send("POST", "/api/v1/accounts", Some(&k), Some(&big))
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/accounts")
        .header("authorization", format!("Bearer {k}"))
        .header("content-type", "text/plain")
        .body(Body::from("{\"path\":\"a\"}"))
        .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Nothing above created anything.
    let (_, v) = h.admin("GET", "/api/v1/accounts?under=/", None).await;
    assert_eq!(v["accounts"].as_array().unwrap().len(), 0, "{v}");
}

#[tokio::test]
async fn scopes_subtrees_and_revocation() {
    let h = harness().await;
    for p in ["acme/cn", "acme/us", "other"] {
        let (s, _) = h
            .admin("POST", "/api/v1/accounts", Some(json!({"path": p})))
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let cn_admin = h.key("acme/cn", &["admin"]).await;
    let gw = h.key("acme/cn", &["gateway"]).await;
    // Wrong scope.
    let (s, v) = h
        .send("GET", "/api/v1/accounts/acme/cn", Some(&gw), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("lacks the read scope")
    );
    // Outside the subtree.
    let (s, _) = h
        .send("GET", "/api/v1/accounts/acme/us", Some(&cn_admin), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/accounts",
            Some(&cn_admin),
            Some("{\"path\": \"acme/us/x\"}"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/accounts",
            Some(&cn_admin),
            Some("{\"path\": \"acme/cn/x\"}"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // No escalation: an admin key cannot mint an audit key.
    let (s, v) = h
        .send(
            "POST",
            "/api/v1/keys",
            Some(&cn_admin),
            Some("{\"account\": \"acme/cn\", \"scopes\": [\"audit\"]}"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // The key list never shows secrets.
    let (s, v) = h.admin("GET", "/api/v1/keys?account=acme", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!v.to_string().contains(&gw), "secret leaked in list");
    assert_eq!(v["keys"].as_array().unwrap().len(), 2);
    // Revocation is immediate, even for a key that was just used (and cached).
    let (s, _) = h
        .send("GET", "/api/v1/accounts/acme/cn", Some(&cn_admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let id = &cn_admin[3..15];
    let (s, v) = h.admin("DELETE", &format!("/api/v1/keys/{id}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["revoked_at"].is_string());
    let (s, v) = h
        .send("GET", "/api/v1/accounts/acme/cn", Some(&cn_admin), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["detail"].as_str().unwrap().contains("revoked"));
}

fn hash(v: &Value) -> Hash {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap();
    raw.try_into().unwrap()
}

fn hashes(v: &Value) -> Vec<Hash> {
    v.as_array().unwrap().iter().map(hash).collect()
}

#[tokio::test]
async fn corrections_show_in_usage_and_proofs_verify() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn"})))
        .await;
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/adjustments",
            Some(json!({
                "account": "acme/cn", "reason": "backfill of an offline batch", "service": "llm.chat",
                "model": "gpt-4o", "tokens": {"text.input": 30, "text.output": 5}
            })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["entry_id"].as_u64().unwrap();
    // A correction must name an entry of the same account that is usage.
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/adjustments",
            Some(json!({
                "account": "acme/cn", "reason": "x", "service": "llm.chat", "corrects": 0,
                "tokens": {"text.input": 1}
            })),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = h
        .admin(
            "GET",
            "/api/v1/usage?account=acme&group_by=model,account",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"][0]["tokens"]["text.input"], 30);
    assert_eq!(v["rows"][0]["total"], 35);
    assert_eq!(v["rows"][0]["account"], "acme/cn");

    let (s, p) = h
        .admin("GET", &format!("/api/v1/audit/entries/{id}/proof"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    let entry = p["entry"].as_str().unwrap().as_bytes();
    let proof = hashes(&p["proof"]);
    let root = hash(&p["root_hash"]);
    let size = p["tree_size"].as_u64().unwrap();
    ciyuan_tlog::verify_inclusion(&ciyuan_tlog::leaf_hash(entry), id, size, &proof, &root).unwrap();
    let verifier = ciyuan_tlog::NoteVerifier::from_vkey(p["public_key"].as_str().unwrap()).unwrap();
    let cp =
        ciyuan_tlog::open_checkpoint(&verifier, p["checkpoint"].as_str().unwrap(), None).unwrap();
    assert_eq!(cp.root, root);
    assert_eq!(cp.size, size);

    // Consistency between the first checkpoint and a later one.
    let (_, first) = h.admin("POST", "/api/v1/audit/checkpoint", None).await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "later"})))
        .await;
    let (_, second) = h.admin("POST", "/api/v1/audit/checkpoint", None).await;
    let (m, n) = (
        first["size"].as_u64().unwrap(),
        second["size"].as_u64().unwrap(),
    );
    assert!(n > m);
    let (s, c) = h
        .admin(
            "GET",
            &format!("/api/v1/audit/consistency?from={m}&to={n}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    let proof = hashes(&c["proof"]);
    let r1 = hash(&first["root_hash"]);
    let r2 = hash(&second["root_hash"]);
    ciyuan_tlog::verify_consistency(m, n, &r1, &r2, &proof).unwrap();
}

impl Harness {
    async fn events(&self, key: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/events")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", content_type)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn event(id: &str, subject: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "svc://billing-test", "type": "llm.usage",
        "subject": subject, "data": data,
    })
}

/// A batch is read in one pass: members that are not events, or events whose
/// attributes repeat, are refused one by one and their neighbours go on.
#[tokio::test]
async fn a_batch_refuses_each_member_that_is_not_an_event_on_its_own() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme/cn"})))
        .await;
    let ingest = h.key("acme/cn", &["ingest"]).await;
    let good = |id: &str| event(id, "acme/cn", json!({"model": "gpt-4o", "input_tokens": 3}));
    // Written by hand: a JSON value cannot hold a repeated member.
    let body = format!(
        r#"[{}, {{"specversion":"1.0","id":"d1","source":"s","id":"d2","type":"llm.usage","subject":"acme/cn","data":{{"model":"m","input_tokens":1}}}},
           {{"specversion":"1.0","id":"n1","source":"s","type":"llm.usage","subject":"acme/cn","time":null,"time":null,"data":{{"model":"m","input_tokens":1}}}},
           [1, {{"id": "x"}}], 7, "text", true, null,
           {{"spec\u0076ersion":"1.0","id":"esc","source":"s","type":"llm.usage","subject":"acme/cn","data":{{"model":"m","input_tokens":1}}}}, {}]"#,
        good("a1"),
        good("a2")
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents-batch+json", &body)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 10, "{v}");
    let detail = |i: usize| {
        results[i]["error"]["detail"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    for i in [0, 8, 9] {
        assert_eq!(results[i]["status"], "accepted", "{i}: {}", results[i]);
    }
    for (i, needle) in [
        (1, "invalid event: duplicate attribute `id`"),
        (2, "invalid event: duplicate attribute `time`"),
        (3, "an event must be a JSON object, got an array"),
        (4, "an event must be a JSON object, got a number"),
        (5, "an event must be a JSON object, got a string"),
        (6, "an event must be a JSON object, got a boolean"),
        (7, "an event must be a JSON object, got null"),
    ] {
        assert_eq!(results[i]["status"], "rejected", "{i}: {}", results[i]);
        assert!(
            detail(i).contains(needle),
            "{i}: {} lacks {needle}",
            results[i]
        );
    }
    assert_eq!(v["accepted"], 3, "{v}");
}

#[tokio::test]
async fn ingest_is_idempotent_and_answers_per_event() {
    let h = harness().await;
    for p in ["acme/cn", "acme/us"] {
        h.admin("POST", "/api/v1/accounts", Some(json!({"path": p})))
            .await;
    }
    let ingest = h.key("acme/cn", &["ingest"]).await;
    let single = event(
        "e1",
        "acme/cn",
        json!({"model": "gpt-4o", "input_tokens": 19, "output_tokens": 10}),
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &single.to_string())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["status"], "accepted");
    let first = v["entry_id"].as_u64().unwrap();
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &single.to_string())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "duplicate");
    assert_eq!(v["entry_id"], first);

    let old = (ciyuan_core::jiff::Timestamp::now()
        - ciyuan_core::jiff::SignedDuration::from_hours(24 * 30))
    .to_string();
    let late = (ciyuan_core::jiff::Timestamp::now()
        - ciyuan_core::jiff::SignedDuration::from_hours(30))
    .to_string();
    let mut late_event = event(
        "late",
        "acme/cn",
        json!({"model": "qwen-max", "input_tokens": 7}),
    );
    late_event["time"] = json!(late);
    let mut too_old = event("old", "acme/cn", json!({"model": "m", "input_tokens": 1}));
    too_old["time"] = json!(old);
    let mut wrong_version = event("v", "acme/cn", json!({"model": "m", "input_tokens": 1}));
    wrong_version["specversion"] = json!("0.3");
    let mut face = event("f", "acme/cn", json!({"matches": 1}));
    face["type"] = json!("voice.clone");
    let batch = json!([
        event(
            "e2",
            "acme/cn",
            json!({"model": "gpt-4o", "input_tokens": 5, "cached_input_tokens": 100, "reasoning_tokens": 3, "tokens": {"image.input": 85}})
        ),
        single,
        event("neg", "acme/cn", json!({"model": "m", "input_tokens": -1})),
        event(
            "frac",
            "acme/cn",
            json!({"model": "m", "input_tokens": 1.5})
        ),
        event(
            "big",
            "acme/cn",
            json!({"model": "m", "input_tokens": 18446744073709551615u64})
        ),
        event(
            "huge",
            "acme/cn",
            serde_json::from_str::<Value>(r#"{"model": "m", "input_tokens": 1e400}"#)
                .unwrap_or(json!({"model": "m", "input_tokens": "x"}))
        ),
        event("nomodel", "acme/cn", json!({"input_tokens": 1})),
        event("field", "acme/cn", json!({"model": "m", "input_tokns": 1})),
        event(
            "outside",
            "acme/us",
            json!({"model": "m", "input_tokens": 1})
        ),
        event(
            "ghost",
            "acme/cn/ghost",
            json!({"model": "m", "input_tokens": 1})
        ),
        event(
            "badpath",
            "acme//cn",
            json!({"model": "m", "input_tokens": 1})
        ),
        too_old,
        wrong_version,
        face,
        json!({"specversion": "1.0", "source": "s", "type": "llm.usage", "subject": "acme/cn", "data": {}}),
        json!("not an object"),
        late_event,
        event(
            "e2",
            "acme/cn",
            json!({"model": "gpt-4o", "input_tokens": 5})
        ),
        json!({"specversion": "1.0", "id": "chatcmpl-1", "source": "gateway", "type": "llm.usage", "subject": "acme/cn", "data": {"model": "m", "input_tokens": 1}}),
    ]);
    let (s, v) = h
        .events(
            &ingest,
            "application/cloudevents-batch+json",
            &batch.to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let results = v["results"].as_array().unwrap();
    let detail = |i: usize| {
        results[i]["error"]["detail"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(results[0]["status"], "accepted");
    assert_eq!(results[1]["status"], "duplicate");
    assert_eq!(results[1]["entry_id"], first);
    for (i, needle) in [
        (2, "data.input_tokens: must not be negative"),
        (3, "data.input_tokens: must be a whole number"),
        (
            4,
            "data.input_tokens: 18446744073709551615 is more than the largest accepted count",
        ),
        (5, "data.input_tokens"),
        (6, "data.model: required"),
        (7, "data.input_tokns: unknown field"),
        (8, "outside the subtree"),
        (9, "account acme/cn/ghost does not exist"),
        (
            10,
            "subject: account path \"acme//cn\" has an empty segment",
        ),
        (11, "older than the accepted window"),
        (12, "specversion: \"0.3\" is not supported"),
        (13, "unknown service \"voice.clone\""),
        (14, "id: required attribute is missing"),
        (15, "an event must be a JSON object"),
        (17, "duplicate of event 0 in the same batch"),
        (18, "source: \"gateway\" is reserved"),
    ] {
        assert_eq!(results[i]["status"], "rejected", "{i}: {}", results[i]);
        assert!(
            detail(i).contains(needle),
            "{i}: {} lacks {needle}",
            results[i]
        );
    }
    assert_eq!(results[16]["status"], "accepted", "{}", results[16]);
    assert_eq!(
        (
            v["accepted"].as_u64(),
            v["duplicates"].as_u64(),
            v["rejected"].as_u64()
        ),
        (Some(2), Some(1), Some(16))
    );

    // Only the accepted events count, each once; the late one lands in its own hour.
    let (_, u) = h
        .admin("GET", "/api/v1/usage?account=acme&group_by=model", None)
        .await;
    let rows = u["rows"].as_array().unwrap();
    let gpt = rows.iter().find(|r| r["model"] == "gpt-4o").unwrap();
    assert_eq!(
        gpt["tokens"],
        json!({"text.input": 24, "text.cached_input": 100, "text.output": 10, "text.reasoning": 3, "image.input": 85})
    );
    let (_, u) = h
        .admin(
            "GET",
            "/api/v1/usage?account=acme&group_by=model&bucket=hour",
            None,
        )
        .await;
    let qwen: Vec<&Value> = u["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["model"] == "qwen-max")
        .collect();
    assert_eq!(qwen.len(), 1);
    let hour =
        ciyuan_core::jiff::Timestamp::from_second(ciyuan_store::floor_hour(late.parse().unwrap()))
            .unwrap();
    assert_eq!(
        qwen[0]["bucket_start"],
        hour.strftime("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    );
}

#[tokio::test]
async fn ingest_refuses_bad_requests_whole() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme"})))
        .await;
    let ingest = h.key("acme", &["ingest"]).await;
    let reader = h.key("acme", &["read"]).await;
    let ok = event("x", "acme", json!({"model": "m", "input_tokens": 1})).to_string();
    let cases: Vec<(&str, &str, String, StatusCode, &str)> = vec![
        (
            &reader,
            "application/cloudevents+json",
            ok.clone(),
            StatusCode::FORBIDDEN,
            "lacks the ingest scope",
        ),
        (
            &ingest,
            "text/plain",
            ok.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "cloudevents",
        ),
        (
            &ingest,
            "application/cloudevents+json",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            &ingest,
            "application/cloudevents-batch+json",
            "[]".into(),
            StatusCode::BAD_REQUEST,
            "no event",
        ),
        (
            &ingest,
            "application/cloudevents-batch+json",
            ok.clone(),
            StatusCode::BAD_REQUEST,
            "must be a JSON array",
        ),
        (
            &ingest,
            "application/cloudevents+json",
            "x".repeat(5000),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
    ];
    for (key, ct, body, status, needle) in cases {
        let (s, v) = h.events(key, ct, &body).await;
        assert_eq!(s, status, "{ct} {}: {v}", &body[..body.len().min(40)]);
        assert!(
            v["detail"].as_str().unwrap_or("").contains(needle),
            "{v} lacks {needle}"
        );
    }
    // Invalid UTF-8.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/events")
        .header("authorization", format!("Bearer {ingest}"))
        .header("content-type", "application/cloudevents+json")
        .body(Body::from(vec![b'{', 0xff, 0xfe, b'}']))
        .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // A single rejected event is an error in the provider-neutral problem shape.
    let bad = event("n", "acme", json!({"model": "m", "input_tokens": -5})).to_string();
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &bad)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("must not be negative")
    );
    // Nothing of the above was recorded.
    let (_, u) = h.admin("GET", "/api/v1/usage?account=acme", None).await;
    assert_eq!(u["rows"].as_array().unwrap().len(), 0, "{u}");
}

/// Deep nesting is passed over where the reader does not read and refused where it
/// would build a value (`serde_json` stops at 128 levels); never a 5xx.
#[tokio::test]
async fn ingest_passes_over_deep_nesting_and_refuses_it_where_it_would_build() {
    let h = harness().await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme"})))
        .await;
    let ingest = h.key("acme", &["ingest"]).await;
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let event = |id: &str, service: &str, extension: &str, data: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"app","type":"{service}","subject":"acme"{extension},"data":{data}}}"#
        )
    };
    // In an extension attribute, which the reader passes over.
    let body = event(
        "deep",
        "llm.usage",
        &format!(r#","x":{deep}"#),
        r#"{"model":"m","input_tokens":1}"#,
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &body)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // In a member of llm.usage's data: named and refused, without reading it.
    let body = event(
        "deep-data",
        "llm.usage",
        "",
        &format!(r#"{{"model":"m","input_tokens":1,"y":{deep}}}"#),
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &body)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("data.y: unknown field"),
        "{v}"
    );
    // As a batch's member: that member alone is refused, as not an object.
    let (s, v) = h
        .events(
            &ingest,
            "application/cloudevents-batch+json",
            &format!("[{deep}]"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rejected"], 1, "{v}");
    assert!(v.to_string().contains("an array"), "{v}");
    // Where a definition reads data as values, the parser's bound refuses it.
    let body = event(
        "deep-doc",
        "doc.verify",
        "",
        &format!(r#"{{"pages":{deep}}}"#),
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &body)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("recursion limit"),
        "{v}"
    );
}

#[tokio::test]
async fn rule_defined_services_record_their_definition_and_measures() {
    let h = harness().await;
    h.admin(
        "POST",
        "/api/v1/accounts",
        Some(json!({"path": "bank/kyc"})),
    )
    .await;
    let ingest = h.key("bank", &["ingest"]).await;
    let mut doc = event("d1", "bank/kyc", json!({"pages": 3, "country": "CN"}));
    doc["type"] = json!("doc.verify");
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &doc.to_string())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["entry_id"].as_u64().unwrap();
    let (_, e) = h
        .admin("GET", &format!("/api/v1/audit/entries/{id}"), None)
        .await;
    let entry: Value = serde_json::from_str(e["entry"].as_str().unwrap()).unwrap();
    assert_eq!(entry["data"]["tokens"], json!({"other.input": 11}));
    assert_eq!(entry["data"]["definition"], "doc.verify@1");
    assert_eq!(
        entry["data"]["measures"],
        json!({"country": "CN", "pages": 3})
    );
    let mut missing = event("d2", "bank/kyc", json!({"country": "CN"}));
    missing["type"] = json!("doc.verify");
    let (s, v) = h
        .events(
            &ingest,
            "application/cloudevents+json",
            &missing.to_string(),
        )
        .await;
    // A measure the definition needs is missing: a bad request naming the field.
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("data.pages: required: doc.verify@1 computes other.input = 5 + 2 * pages"),
        "{v}"
    );
    let (_, u) = h
        .admin("GET", "/api/v1/usage?account=bank&group_by=service", None)
        .await;
    assert_eq!(u["rows"][0]["service"], "doc.verify");
    assert_eq!(u["rows"][0]["total"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_carrying_the_same_events_record_each_once() {
    let h = Arc::new(harness().await);
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme"})))
        .await;
    let ingest = h.key("acme", &["ingest"]).await;
    // Ids with JSON escapes take the owned path of the borrowed parser.
    let ids: Vec<String> = (0..8).map(|i| format!("c\\u00e9-{i}")).collect();
    let mut tasks = Vec::new();
    for r in 0..8usize {
        let (h, ingest) = (h.clone(), ingest.clone());
        let mut order = ids.clone();
        order.rotate_left(r);
        tasks.push(tokio::spawn(async move {
            let body = format!(
                "[{}]",
                order
                    .iter()
                    .map(|id| format!(
                        r#"{{"specversion":"1.0","id":"{id}","source":"svc://race","type":"llm.usage","subject":"acme","data":{{"model":"m","input_tokens":2}}}}"#
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            h.events(&ingest, "application/cloudevents-batch+json", &body)
                .await
        }));
    }
    let mut accepted = 0;
    let mut entry_of: std::collections::HashMap<String, u64> = Default::default();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        accepted += v["accepted"].as_u64().unwrap();
        assert_eq!(v["rejected"], 0, "{v}");
        for r in v["results"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap().to_string();
            let e = r["entry_id"].as_u64().unwrap();
            assert!(id.starts_with("cé-"), "{id}");
            // Every answer for an event names the same entry.
            assert_eq!(*entry_of.entry(id).or_insert(e), e, "{v}");
        }
    }
    assert_eq!(accepted, 8, "each event accepted exactly once");
    assert_eq!(entry_of.len(), 8);
    let (_, u) = h.admin("GET", "/api/v1/usage?account=acme", None).await;
    assert_eq!(u["rows"][0]["tokens"], json!({"text.input": 16}), "{u}");
    // A member given twice would be counted twice: refused, naming it.
    let twice = r#"{"specversion":"1.0","id":"t","source":"s","type":"llm.usage","subject":"acme","data":{"model":"m","input_tokens":2,"input_tokens":3}}"#;
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", twice)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("data.input_tokens: appears more than once"),
        "{v}"
    );
}

#[tokio::test]
async fn repeats_answer_the_original_entry_once_projected_and_after_a_restart() {
    let store: Arc<dyn Store> =
        Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
    let log: Arc<dyn Log> = Arc::new(MemLog::new());
    let h = harness_on(store.clone(), log.clone(), None).await;
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acme"})))
        .await;
    let ingest = h.key("acme", &["ingest"]).await;
    let batch = |ids: &[&str]| {
        json!(
            ids.iter()
                .map(|id| event(id, "acme", json!({"model": "m", "input_tokens": 2})))
                .collect::<Vec<_>>()
        )
        .to_string()
    };
    let entries = |v: &Value| -> Vec<(String, u64)> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["status"].as_str().unwrap().to_string(),
                    r["entry_id"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    };
    let kind = "application/cloudevents-batch+json";
    let (_, first) = h.events(&ingest, kind, &batch(&["a", "b", "c"])).await;
    let original: Vec<u64> = entries(&first).iter().map(|e| e.1).collect();
    assert!(entries(&first).iter().all(|e| e.0 == "accepted"), "{first}");
    // A query waits for the projections; the next request finds the claim projected,
    // drops it and answers repeats from the index and the log.
    h.admin("GET", "/api/v1/usage?account=acme", None).await;
    let (_, other) = h.events(&ingest, kind, &batch(&["d"])).await;
    assert_eq!(entries(&other)[0].0, "accepted");
    let (_, again) = h.events(&ingest, kind, &batch(&["b", "a", "e", "c"])).await;
    assert_eq!(
        entries(&again),
        vec![
            ("duplicate".to_string(), original[1]),
            ("duplicate".into(), original[0]),
            ("accepted".into(), entries(&again)[2].1),
            ("duplicate".into(), original[2]),
        ],
        "{again}"
    );
    // After a restart on the same store and log: the index is loaded from the store.
    h.admin("GET", "/api/v1/usage?account=acme", None).await;
    let admin = h.admin.clone();
    drop(h);
    let h = harness_on(store, log, Some(admin)).await;
    let (_, after) = h.events(&ingest, kind, &batch(&["c", "e", "f"])).await;
    let after = entries(&after);
    assert_eq!(after[0], ("duplicate".to_string(), original[2]));
    assert_eq!(after[1].0, "duplicate");
    assert_eq!(after[2].0, "accepted");
    // Each event counted once: a..f, 2 tokens each.
    let (_, u) = h.admin("GET", "/api/v1/usage?account=acme", None).await;
    assert_eq!(u["rows"][0]["tokens"], json!({"text.input": 12}), "{u}");
}

/// Issue 14: token definitions are ledger entries. The configuration's are recorded
/// once (a restart appends nothing), a version's rules are never rewritten, a new
/// version never takes effect in the past, only a root admin declares, and events are
/// measured by the ledger's version in force at their time.
#[tokio::test]
async fn definitions_are_ledger_entries_declared_once_and_never_rewritten() {
    let store: Arc<dyn Store> =
        Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
    let log: Arc<dyn Log> = Arc::new(MemLog::new());
    let h = harness_on(store.clone(), log.clone(), None).await;
    let (s, listed) = h.admin("GET", "/api/v1/definitions", None).await;
    assert_eq!(s, StatusCode::OK, "{listed}");
    let ids = |v: &Value| -> Vec<(String, u64)> {
        v["definitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["id"].as_str().unwrap().to_string(),
                    d["entry"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let first = ids(&listed);
    assert_eq!(
        first.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["doc.verify@1", "face.match@1"]
    );
    assert_eq!(listed["definitions"][0]["set_by"], "/");
    let size = log.size();
    let admin = h.admin.clone();
    drop(h);
    let h = harness_on(store, log.clone(), Some(admin)).await;
    assert_eq!(
        log.size(),
        size,
        "a restart with the same file appends nothing"
    );
    let (_, again) = h.admin("GET", "/api/v1/definitions", None).await;
    assert_eq!(ids(&again), first);

    let def = |version: u32, from: String, expr: &str| {
        json!({"service": "doc.verify", "version": version, "effective_from": from,
               "tokens": {"other.input": expr}})
    };
    let past = "2021-01-01T00:00:00Z".to_string();
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/definitions",
            Some(def(1, "2020-01-01T00:00:00Z".into(), "9")),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("declare version 2"),
        "{v}"
    );
    let (s, v) = h
        .admin("POST", "/api/v1/definitions", Some(def(2, past, "pages")))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("in the past"), "{v}");

    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "bank"})))
        .await;
    let tenant = h.key("bank", &["admin"]).await;
    let from = Timestamp::now() + std::time::Duration::from_secs(2);
    let body = def(2, from.to_string(), "100 * pages").to_string();
    let (s, v) = h
        .send("POST", "/api/v1/definitions", Some(&tenant), Some(&body))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/definitions",
            Some(def(2, from.to_string(), "100 * pages")),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["appended"], json!(["doc.verify@2"]));

    let ingest = h.key("bank", &["ingest"]).await;
    let measured = |id: &str, at: Timestamp| {
        let mut e = event(id, "bank", json!({"pages": 3}));
        e["type"] = json!("doc.verify");
        e["time"] = json!(at.to_string());
        e
    };
    for (id, at, want) in [
        ("before", Timestamp::now(), ("doc.verify@1", 11)),
        (
            "after",
            from + std::time::Duration::from_secs(1),
            ("doc.verify@2", 300),
        ),
    ] {
        let (s, v) = h
            .events(
                &ingest,
                "application/cloudevents+json",
                &measured(id, at).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let entry_id = v["entry_id"].as_u64().unwrap();
        let (_, e) = h
            .admin("GET", &format!("/api/v1/audit/entries/{entry_id}"), None)
            .await;
        let entry: Value = serde_json::from_str(e["entry"].as_str().unwrap()).unwrap();
        assert_eq!(entry["data"]["definition"], want.0, "{entry}");
        assert_eq!(entry["data"]["tokens"]["other.input"], want.1, "{entry}");
    }
}

/// The LiteLLM table as providers' users keep it (see `../shared/fixtures`).
const LITELLM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/litellm_model_prices.json"
);

/// Issue 14: a price book imported from LiteLLM's real table prices usage as it is
/// appended (1M input + 200k output tokens of gpt-4o are 4.50 USD at list price), a
/// contract from above discounts a subtree, a tenant cannot set its own, an unpriced
/// model is rated zero and raises an incident, and no version takes effect in the past.
#[tokio::test]
async fn usage_is_rated_as_appended_with_the_book_and_contract_in_force() {
    use sha2::Digest;
    let h = harness().await;
    let file = std::fs::read(LITELLM).unwrap();
    let req = Request::post("/api/v1/prices?format=litellm")
        .header("authorization", format!("Bearer {}", h.admin))
        .header("content-type", "application/json")
        .body(Body::from(file.clone()))
        .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let book: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status, StatusCode::OK, "{book}");
    assert_eq!(
        (book["name"].as_str(), book["version"].as_u64()),
        (Some("list"), Some(1))
    );
    assert_eq!(
        book["source"]["sha256"],
        hex::encode(sha2::Sha256::digest(&file)),
        "the entry names the file it came from"
    );
    assert!(
        !book["source"]["unmapped"].as_array().unwrap().is_empty(),
        "keys it cannot map are listed"
    );

    for p in ["acme/cn", "acme/us"] {
        h.admin("POST", "/api/v1/accounts", Some(json!({"path": p})))
            .await;
    }
    let ingest = h.key("acme", &["ingest"]).await;
    let rated = |id: &str, subject: &str, model: &str| {
        let h = &h;
        let ingest = ingest.clone();
        let e = event(
            id,
            subject,
            json!({"model": model, "input_tokens": 1_000_000, "output_tokens": 200_000}),
        );
        async move {
            let (s, v) = h
                .events(&ingest, "application/cloudevents+json", &e.to_string())
                .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let id = v["entry_id"].as_u64().unwrap();
            let (_, e) = h
                .admin("GET", &format!("/api/v1/audit/entries/{id}"), None)
                .await;
            let entry: Value = serde_json::from_str(e["entry"].as_str().unwrap()).unwrap();
            entry["data"]["rating"].clone()
        }
    };
    let r = rated("e1", "acme/us", "gpt-4o").await;
    assert_eq!(r["currency"], "USD", "{r}");
    assert_eq!(
        (r["book"].as_str(), r["version"].as_u64()),
        (Some("list"), Some(1))
    );
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(r["amount"].as_str().unwrap()).unwrap(),
        rust_decimal::Decimal::new(450, 2),
        "{r}"
    );
    assert_eq!(
        r["lines"].as_array().unwrap().len(),
        2,
        "unit prices kept: {r}"
    );

    // A tenant does not price itself; a key above it does.
    let tenant = h.key("acme/cn", &["admin"]).await;
    let contract = json!({"book": "list", "discount_percent": "10"}).to_string();
    let (s, v) = h
        .send(
            "PUT",
            "/api/v1/contracts/acme/cn",
            Some(&tenant),
            Some(&contract),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/contracts/acme/cn",
            Some(json!({"book": "list", "discount_percent": "101"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a discount beyond 100%: {v}");
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/contracts/acme/cn",
            Some(json!({"book": "list", "discount_percent": "10"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Once set from above, the node's own admin still cannot replace it.
    let better = json!({"book": "list", "discount_percent": "90"}).to_string();
    let (s, v) = h
        .send(
            "PUT",
            "/api/v1/contracts/acme/cn",
            Some(&tenant),
            Some(&better),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let r = rated("e2", "acme/cn", "gpt-4o").await;
    assert_eq!(r["contract"], "acme/cn", "{r}");
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(r["amount"].as_str().unwrap()).unwrap(),
        rust_decimal::Decimal::new(405, 2),
        "{r}"
    );

    // No rule prices it: zero, marked, and an incident names it.
    let r = rated("e3", "acme/us", "no-such-model-anywhere").await;
    assert_eq!(r["unpriced"], true, "{r}");
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(r["amount"].as_str().unwrap()).unwrap(),
        rust_decimal::Decimal::ZERO
    );
    let (_, incidents) = h.admin("GET", "/api/v1/incidents?account=acme", None).await;
    assert!(
        incidents.to_string().contains("price.unpriced")
            && incidents.to_string().contains("no-such-model-anywhere"),
        "{incidents}"
    );

    // A money limit counts the rated amounts: 50% of 10 USD is crossed by e1 + e2
    // once set (restored from the cost rollups), and again by new usage.
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/budgets/acme",
            Some(json!({"name": "spend", "amount": "10", "currency": "USD", "period": "month", "thresholds": [50, 90]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let spend = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "spend")
        .unwrap()
        .clone();
    assert_eq!(spend["cost"]["used"], "8.55", "{spend}");
    // A key at the node cannot lift or remove a money limit set above it.
    let acme_admin = h.key("acme", &["admin"]).await;
    let lift = json!({"name": "spend", "amount": "1000000", "currency": "USD", "period": "month"});
    let (s, v) = h
        .send(
            "PUT",
            "/api/v1/budgets/acme",
            Some(&acme_admin),
            Some(&lift.to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = h
        .send(
            "DELETE",
            "/api/v1/budgets/acme?name=spend",
            Some(&acme_admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Amounts past their bounds are refused, naming the field.
    for (amount, what) in [
        (json!("-1"), "amount"),
        (json!(10.5), "amount"),
        (json!("1e40"), "amount"),
        (json!("0.1"), "currency"),
    ] {
        let mut body =
            json!({"name": "odd", "amount": amount, "currency": "USD", "period": "month"});
        if what == "currency" {
            body["currency"] = json!("usd");
        }
        let (s, v) = h.admin("PUT", "/api/v1/budgets/acme/us", Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{amount}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains(what),
            "{amount}: {v}"
        );
    }
    rated("e4", "acme/us", "gpt-4o").await;
    let (_, incidents) = h.admin("GET", "/api/v1/incidents?account=acme", None).await;
    let crossed = incidents["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["limit"] == "spend")
        .map(|i| (i["kind"].clone(), i["threshold"].clone(), i["cost"].clone()))
        .collect::<Vec<_>>();
    // Usage that already happened is recorded; the hard limit it went over is named.
    let money = json!({"amount": "10", "currency": "USD", "used": "13.05"});
    assert!(
        crossed.contains(&(json!("budget.exceeded"), Value::Null, money.clone())),
        "{incidents}"
    );
    assert!(
        crossed.contains(&(json!("budget.threshold"), json!(90), money)),
        "{incidents}"
    );

    // Usage with its cost: 4.50 + 4.05 + 0 + 4.50, by currency, exact.
    let (s, u) = h
        .admin(
            "GET",
            "/api/v1/usage?account=acme&group_by=account&with=cost",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{u}");
    let dec = |v: &Value| rust_decimal::Decimal::from_str_exact(v.as_str().unwrap()).unwrap();
    assert_eq!(
        dec(&u["cost_totals"]["USD"]),
        rust_decimal::Decimal::new(1305, 2),
        "{u}"
    );
    let cn = u["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == "acme/cn")
        .unwrap();
    assert_eq!(
        dec(&cn["cost"]["USD"]),
        rust_decimal::Decimal::new(405, 2),
        "{u}"
    );

    // The tier the event says it was served at picks its prices: batch is half.
    let mut batch = event(
        "e-batch",
        "acme/us",
        json!({"model": "gpt-4o", "input_tokens": 1_000_000, "output_tokens": 200_000,
               "service_tier": "batch"}),
    );
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &batch.to_string())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, e) = h
        .admin(
            "GET",
            &format!("/api/v1/audit/entries/{}", v["entry_id"]),
            None,
        )
        .await;
    let entry: Value = serde_json::from_str(e["entry"].as_str().unwrap()).unwrap();
    assert_eq!(entry["data"]["tier"], "batch", "{entry}");
    assert_eq!(
        rust_decimal::Decimal::from_str_exact(entry["data"]["rating"]["amount"].as_str().unwrap())
            .unwrap(),
        rust_decimal::Decimal::new(225, 2),
        "{entry}"
    );
    batch["id"] = json!("e-bad-tier");
    batch["data"]["service_tier"] = json!("fancy");
    let (s, v) = h
        .events(&ingest, "application/cloudevents+json", &batch.to_string())
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("data.service_tier"),
        "{v}"
    );

    // Price books price every tenant: a tenant's admin records none.
    let req = Request::post("/api/v1/prices?format=litellm")
        .header("authorization", format!("Bearer {acme_admin}"))
        .body(Body::from(std::fs::read(LITELLM).unwrap()))
        .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A new version never takes effect in the past.
    let req = Request::post("/api/v1/prices?format=litellm&effective_from=2020-01-01T00:00:00Z")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(Body::from(file))
        .unwrap();
    let resp = h.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// Issue 14: wallets are moved by balanced postings from strictly above the node; a
/// refund or transfer beyond the balance is refused and not recorded; history pages
/// by entry; the engine rebuilt after a restart holds the same balances.
#[tokio::test]
async fn wallets_move_by_balanced_postings_from_above_and_survive_a_restart() {
    let store: Arc<dyn Store> =
        Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
    let log: Arc<dyn Log> = Arc::new(MemLog::new());
    let h = harness_on(store.clone(), log.clone(), None).await;
    for p in ["acme/cn", "acme/us"] {
        h.admin("POST", "/api/v1/accounts", Some(json!({"path": p})))
            .await;
    }
    let tenant = h.key("acme", &["admin"]).await;
    let post = |key: &str, path: &str, body: Value| {
        let h = &h;
        let key = key.to_string();
        let path = path.to_string();
        async move {
            h.send(
                "POST",
                &format!("/api/v1/wallets/{path}"),
                Some(&key),
                Some(&body.to_string()),
            )
            .await
        }
    };
    let topup = |amount: &str| json!({"kind": "topup", "amount": amount, "currency": "CNY"});
    // A tenant does not fund itself.
    let (s, v) = post(&tenant, "acme", topup("100")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let admin = h.admin.clone();
    let (s, v) = post(&admin, "acme", topup("100.10")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["wallet"]["balance"], "100.1");
    // From above, the tenant funds its children.
    let (s, v) = post(&tenant, "acme/cn", topup("30")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = post(
        &tenant,
        "acme/cn",
        json!({"kind": "transfer", "amount": "12.5", "currency": "CNY", "to": "acme/us"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Beyond the balance: refused, and nothing recorded.
    let size = log.size();
    let (s, v) = post(
        &tenant,
        "acme/cn",
        json!({"kind": "transfer", "amount": "18", "currency": "CNY", "to": "acme/us"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(log.size(), size);
    let (s, v) = post(
        &admin,
        "acme",
        json!({"kind": "grant", "amount": "5", "currency": "CNY",
        "grant": {"id": "welcome", "priority": 1, "expires_at": "2099-01-01T00:00:00Z"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = post(
        &admin,
        "acme",
        json!({"kind": "mint", "amount": "5", "currency": "CNY"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The same grant twice is refused, not added.
    let (s, v) = post(
        &admin,
        "acme",
        json!({"kind": "grant", "amount": "5", "currency": "CNY",
        "grant": {"id": "welcome", "priority": 1}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // Amounts past their bounds, or not exact strings, are refused naming the field.
    for amount in [
        json!("0"),
        json!("-5"),
        json!("1e-40"),
        json!("1e40"),
        json!(5.5),
    ] {
        let (s, v) = post(
            &admin,
            "acme",
            json!({"kind": "topup", "amount": amount, "currency": "CNY"}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{amount}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("amount"),
            "{amount}: {v}"
        );
    }
    // A tenant cannot grant itself an overdraft; from above, a negative one is refused.
    let overdraft = |amount: &str| json!({"currency": "CNY", "overdraft": amount}).to_string();
    let (s, v) = h
        .send(
            "PUT",
            "/api/v1/wallets/acme/settings",
            Some(&tenant),
            Some(&overdraft("1000")),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = h
        .send(
            "PUT",
            "/api/v1/wallets/acme/settings",
            Some(&admin),
            Some(&overdraft("-1")),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    async fn balances(h: &Harness) -> Vec<Option<String>> {
        let mut out = Vec::new();
        for p in ["acme", "acme/cn", "acme/us"] {
            let (_, v) = h.admin("GET", &format!("/api/v1/wallets/{p}"), None).await;
            out.push(v["wallets"][0]["balance"].as_str().map(str::to_string));
        }
        out
    }
    let before = balances(&h).await;
    assert_eq!(
        before,
        vec![
            Some("105.1".into()),
            Some("17.5".into()),
            Some("12.5".into())
        ]
    );
    // Every posting balances: debits equal credits on each.
    let (_, v) = h
        .admin("GET", "/api/v1/wallets/acme/cn?limit=1", None)
        .await;
    let first = v["movements"].as_array().unwrap();
    assert_eq!(first.len(), 1);
    let next = v["next"].as_u64().unwrap();
    let (_, v) = h
        .admin(
            "GET",
            &format!("/api/v1/wallets/acme/cn?after={next}"),
            None,
        )
        .await;
    assert_eq!(v["movements"][0]["kind"], "transfer", "{v}");
    for m in v["movements"].as_array().unwrap().iter().chain(first) {
        let sum = |side: &str| -> rust_decimal::Decimal {
            m["legs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| rust_decimal::Decimal::from_str_exact(l[side].as_str().unwrap()).unwrap())
                .sum()
        };
        assert_eq!(sum("debit"), sum("credit"), "{m}");
    }
    drop(h);
    let h = harness_on(store, log, Some(admin)).await;
    assert_eq!(
        balances(&h).await,
        before,
        "rebuilt from the ledger's postings"
    );
}

#[tokio::test]
async fn the_gateway_refuses_in_the_providers_shape_while_the_ledger_cannot_record() {
    let store: Arc<dyn Store> =
        Arc::new(ciyuan_store_sqlite::SqliteStore::open_in_memory().unwrap());
    let log = Arc::new(MemLog::new());
    let h = harness_on(store, log.clone(), None).await;
    let (s, v) = h
        .admin("POST", "/api/v1/accounts", Some(json!({"path": "acme"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let key = h.key("acme", &["gateway"]).await;
    let call = |path: &'static str, body: Value| {
        let router = h.router.clone();
        let key = key.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                headers,
                serde_json::from_slice::<Value>(&bytes).unwrap(),
            )
        }
    };
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let messages = json!({"model": "claude-sonnet-4-5", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]});
    let size = log.size();

    log.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, headers, v) = call("/v1/chat/completions", chat.clone()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(v["error"]["code"], "ledger_unavailable", "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-should-retry"], "true");
    let (s, headers, v) = call("/v1/messages", messages.clone()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("restarting"),
        "{v}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(log.size(), size, "a refused request records nothing");

    // Back: the same request goes on to routing (no provider is configured here).
    log.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (s, _, v) = call("/v1/chat/completions", chat).await;
    assert_ne!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_ne!(v["error"]["code"], "ledger_unavailable", "{v}");
}

#[test]
fn retryable_storage_errors_are_503_with_retry_after_and_permanent_ones_500() {
    use axum::response::IntoResponse;
    let r = crate::error::ApiError::from(ciyuan_store::StoreError::Unavailable(
        "connection closed".into(),
    ))
    .into_response();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = crate::error::ApiError::from(ciyuan_store::StoreError::Backend("duplicate key".into()))
        .into_response();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.headers().get("retry-after").is_none());
    let r = crate::error::ApiError::from(LogError::Unavailable("refused".into())).into_response();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = crate::error::ApiError::from(LogError::Io("corrupt".into())).into_response();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// A node whose heartbeats stop getting through pauses its rating (the rules gate's
/// write guard) after 5 s, and rates again once one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_database_pauses_its_rating_until_a_heartbeat_gets_through() {
    let h = harness().await;
    // The last heartbeat that got through was sent 6 s before the fence looks.
    let epoch = std::time::Instant::now() - Duration::from_secs(6);
    let last_ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (weak, ok) = (Arc::downgrade(&h.app), last_ok.clone());
    std::thread::spawn(move || crate::follow::fence(weak, epoch, ok));
    let gate = h.app.rules_gate.clone();
    let mut fenced = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if gate.try_read().is_err() {
            fenced = true;
            break;
        }
    }
    assert!(
        fenced,
        "rating paused once no heartbeat got through for 5 s"
    );
    // A heartbeat gets through: rating goes on.
    let now = u64::try_from(epoch.elapsed().as_millis()).unwrap();
    last_ok.store(now, std::sync::atomic::Ordering::Release);
    let mut free = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if gate.try_read().is_ok() {
            free = true;
            break;
        }
    }
    assert!(free, "rating resumed once a heartbeat got through");
}

#[tokio::test]
async fn usage_by_child_is_each_childs_subtree_and_the_nodes_own() {
    let h = harness().await;
    for path in ["acme", "acme/cn", "acme/cn/hr", "acme/us", "other"] {
        h.admin("POST", "/api/v1/accounts", Some(json!({"path": path})))
            .await;
    }
    for (account, model, input) in [
        ("acme", "m1", 1),
        ("acme/cn", "m1", 10),
        ("acme/cn/hr", "m2", 100),
        ("acme/us", "m1", 1000),
        ("other", "m1", 10000),
    ] {
        let (s, v) = h
            .admin(
                "POST",
                "/api/v1/adjustments",
                Some(json!({
                    "account": account, "reason": "backfill", "service": "llm.chat",
                    "model": model, "tokens": {"text.input": input}
                })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let rows = |v: &serde_json::Value| -> Vec<(String, i64)> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["account"].as_str().unwrap_or("").to_string(),
                    r["total"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let (s, v) = h
        .admin("GET", "/api/v1/usage?account=acme&group_by=child", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["group_by"], json!(["child"]));
    assert_eq!(
        rows(&v),
        [
            ("acme".to_string(), 1),
            ("acme/cn".to_string(), 110),
            ("acme/us".to_string(), 1000)
        ]
    );
    // By hour too, and from the root: the top-level nodes.
    let (s, v) = h
        .admin(
            "GET",
            "/api/v1/usage?account=/&group_by=child&bucket=hour",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        rows(&v),
        [("acme".to_string(), 1111), ("other".to_string(), 10000)]
    );
    // The subtree's total and its models, from the node's own rollups.
    let (_, v) = h
        .admin("GET", "/api/v1/usage?account=acme/cn&group_by=model", None)
        .await;
    let models: Vec<_> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap().to_string(),
                r["total"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(models, [("m1".to_string(), 10), ("m2".to_string(), 100)]);
    let (s, v) = h
        .admin(
            "GET",
            "/api/v1/usage?account=acme&group_by=child,account",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("exclude each other"),
        "{v}"
    );
}

#[tokio::test]
async fn accounts_listed_by_depth_are_the_direct_children_page_by_page() {
    let h = harness().await;
    // Children with subtrees larger than one scan of the store between them.
    for c in ["a", "b", "c", "d", "e"] {
        for g in ["x", "y", "z"] {
            h.admin(
                "POST",
                "/api/v1/accounts",
                Some(json!({"path": format!("acme/{c}/{g}/deep")})),
            )
            .await;
        }
    }
    h.admin("POST", "/api/v1/accounts", Some(json!({"path": "acmex"})))
        .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let url = match &after {
            Some(a) => format!("/api/v1/accounts?under=acme&depth=1&limit=2&after={a}"),
            None => "/api/v1/accounts?under=acme&depth=1&limit=2".to_string(),
        };
        let (s, v) = h.admin("GET", &url, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for a in v["accounts"].as_array().unwrap() {
            seen.push(a["path"].as_str().unwrap().to_string());
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["acme/a", "acme/b", "acme/c", "acme/d", "acme/e"]);
    let (s, v) = h
        .admin("GET", "/api/v1/accounts?under=/&depth=1", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let top: Vec<_> = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(top, ["acme", "acmex"]);
    let (s, v) = h
        .admin("GET", "/api/v1/accounts?under=acme&depth=2", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
