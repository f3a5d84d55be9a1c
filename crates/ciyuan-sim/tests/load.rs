//! Load smoke test: many concurrent streams and a burst of short requests. Ignored by
//! default (timing-sensitive); run with `cargo test -p ciyuan-sim --release --test load
//! -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ciyuan_sim::{SimConfig, serve};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn thousand_streams_and_a_burst_of_requests() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        SimConfig {
            ttft: Duration::from_millis(100),
            tokens_per_sec: 50.0,
            ..SimConfig::default()
        },
    ));
    let url = format!("http://{addr}/v1/chat/completions");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap();

    // 1,000 concurrent streams of 100 tokens at 50 tokens/s: about 2 s each.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "gpt-4o", "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": format!("question {i}")}]});
            let text = client
                .post(&url)
                .header("x-sim-output-tokens", "100")
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert!(text.contains("\"completion_tokens\":100,"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let streams = t.elapsed();
    println!("1000 concurrent streams of 100 tokens at 50 tok/s: {streams:?}");
    assert!(streams < Duration::from_secs(6), "{streams:?}");

    // 5,000 unpaced requests, 64 at a time.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..(5000 / 64 + 1) {
                let body = json!({"model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": format!("q {w} {i}")}]});
                let r = client
                    .post(&url)
                    .header("x-sim-ttft-ms", "0")
                    .header("x-sim-tokens-per-sec", "0")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = t.elapsed();
    let n = 64 * (5000 / 64 + 1);
    println!(
        "{n} requests: {e:?}, {:.0}/s (client and server on the same cores)",
        n as f64 / e.as_secs_f64()
    );
}
