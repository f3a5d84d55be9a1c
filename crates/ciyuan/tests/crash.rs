//! SIGKILL at random moments while appending (corrections through the admin API and
//! events through the ingest API): after a restart every acknowledged entry is there
//! exactly once, an acknowledged event sent again is answered with its entry, and after
//! a clean stop the ledger verifies. On either backend: on PostgreSQL the kill leaves an
//! uncommitted transaction behind instead of a torn tail.

use crate::common::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Rounds of start, append, kill -9; the issue asks for 50 in a row.
const ROUNDS: usize = 50;
const WRITERS: usize = 4;

#[test]
fn sigkill_while_appending_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut admin = None;
    // marker -> entry id the server acknowledged.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..ROUNDS {
        let server = Server::start(&data);
        if admin.is_none() {
            admin = server.bootstrap.clone();
            let (s, _) = server.http(
                "POST",
                "/api/v1/accounts",
                admin.as_ref().unwrap(),
                Some(&json!({"path": "crash/test"})),
            );
            assert_eq!(s, 201);
        }
        let key = admin.clone().unwrap();
        check_all_present(&server, &key, &acked.lock().unwrap(), round);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (url, key, acked, stop) = (server.url.clone(), key.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let marker = format!("r{round}w{w}n{n}");
                        n += 1;
                        // Half the writers correct, half ingest: both doors append.
                        let (path, body) = if w % 2 == 0 {
                            ("/api/v1/adjustments", json!({"account": "crash/test", "reason": marker, "service": "llm.chat", "tokens": {"text.input": 1}}))
                        } else {
                            ("/v1/events", event(&marker))
                        };
                        let Ok((status, bytes)) = try_http(&url, "POST", path, &key, Some(&body))
                        else {
                            return; // the server died mid-request: not acknowledged
                        };
                        if status == 201 {
                            // The head can arrive without the body when the kill falls
                            // between their writes: an answer cut short acknowledges
                            // nothing (the entry may or may not be there).
                            let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&bytes)
                            else {
                                return;
                            };
                            let id = answer["entry_id"].as_u64().unwrap();
                            acked.lock().unwrap().insert(marker, id);
                        }
                    }
                })
            })
            .collect();
        // Kill at a pseudo-random moment between 20 and 300 ms.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 280));
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            let _ = w.join();
        }
        // Restart: recovery cuts the torn tail; everything acknowledged is there once.
        let server = Server::start(&data);
        check_all_present(&server, &key, &acked.lock().unwrap(), round);
        // The events acknowledged before the kill are known after it: sent again, each
        // is answered with the entry it was given, and appended no second time.
        for (marker, id) in acked.lock().unwrap().iter() {
            if marker.starts_with(&format!("r{round}w")) && is_event(marker) {
                let (status, bytes) = http(
                    &server.url,
                    "POST",
                    "/v1/events",
                    &key,
                    Some(&event(marker)),
                );
                assert_eq!(
                    status,
                    200,
                    "round {round}: {marker} again: {}",
                    String::from_utf8_lossy(&bytes)
                );
                assert_eq!(json(&bytes)["entry_id"].as_u64(), Some(*id), "{marker}");
            }
        }
        server.stop();
        let (code, msg) = verify(&data);
        assert_eq!(
            code, 0,
            "round {round}: verify after kill -9 and restart: {msg}"
        );
    }
    let server = Server::start(&data);
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() > ROUNDS,
        "too few appends acknowledged: {}",
        acked.len()
    );
    let events = acked.keys().filter(|m| is_event(m)).count();
    assert!(
        events > ROUNDS && events < acked.len(),
        "{events} of {} acknowledged appends were events: both doors must be exercised",
        acked.len()
    );
    check_all_present(&server, admin.as_ref().unwrap(), &acked, ROUNDS);
    server.stop();
    let (code, msg) = verify(&data);
    assert_eq!(code, 0, "{msg}");
}

/// A usage event whose id is `marker`.
fn event(marker: &str) -> serde_json::Value {
    json!({"specversion": "1.0", "id": marker, "source": "svc://crash", "type": "llm.usage",
        "subject": "crash/test", "data": {"model": "m", "input_tokens": 1, "output_tokens": 1}})
}

/// Whether a marker was sent by an ingesting writer (odd writer numbers).
fn is_event(marker: &str) -> bool {
    let w = marker.split('w').nth(1).and_then(|t| t.split('n').next());
    w.and_then(|w| w.parse::<usize>().ok())
        .is_some_and(|w| w % 2 == 1)
}

/// Every acknowledged marker is in the log exactly once, at the id it was given.
fn check_all_present(server: &Server, key: &str, acked: &HashMap<String, u64>, round: usize) {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut start = 0u64;
    loop {
        let (s, body) = server.http(
            "GET",
            &format!("/api/v1/audit/entries?start={start}&limit=10000"),
            key,
            None,
        );
        assert_eq!(s, 200);
        let lines: Vec<&[u8]> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            break;
        }
        for (i, line) in lines.iter().enumerate() {
            let v = json(line);
            let marker = v["data"]["reason"]
                .as_str()
                .or_else(|| v["data"]["event_id"].as_str());
            if let Some(reason) = marker {
                seen.entry(reason.to_string())
                    .or_default()
                    .push(start + i as u64);
            }
        }
        start += lines.len() as u64;
    }
    for (marker, id) in acked {
        assert_eq!(
            seen.get(marker),
            Some(&vec![*id]),
            "round {round}: acknowledged {marker} (entry {id})"
        );
    }
    for (marker, ids) in &seen {
        assert_eq!(
            ids.len(),
            1,
            "round {round}: {marker} appears {} times",
            ids.len()
        );
    }
}
