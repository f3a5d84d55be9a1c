//! Service levels evaluated from the gateway's quality records of a past month: the
//! credit owed once, paid into the wallet, billed on the statement; the quality report.

use super::*;
use ciyuan_core::{Quality, Rating, Usage};

/// A gateway request of `node` at `at` to upstream `upstream`, priced `amount` USD under
/// the contract of `contract`.
fn request(
    at: &str,
    node: &str,
    upstream: &str,
    status: u16,
    ttft_ms: u64,
    amount: &str,
    contract: Option<&str>,
) -> Entry {
    let failed = status >= 500;
    let rating: Rating = serde_json::from_value(json!({
        "amount": amount,
        "currency": "USD",
        "book": "list",
        "version": 1,
        "contract": contract,
    }))
    .unwrap();
    Entry::new(
        at.parse().unwrap(),
        node.parse().unwrap(),
        EntryBody::Usage(Usage {
            service: "llm.chat".into(),
            model: Some("gpt-4o".into()),
            source: Some(ciyuan_core::GATEWAY_SOURCE.into()),
            quality: Some(Box::new(Quality {
                upstream: upstream.into(),
                status,
                stream: true,
                ttft_us: (!failed).then_some(ttft_ms * 1000),
                latency_us: ttft_ms * 1000 + 500,
                output_tokens_per_sec: (!failed).then_some(40),
                failure: failed.then(|| "upstream_error".into()),
                ..Quality::default()
            })),
            rating: Some(Box::new(rating)),
            ..Usage::default()
        }),
    )
}

#[tokio::test]
async fn a_missed_service_level_is_credited_once_in_the_wallet_and_on_the_statement() {
    let h = harness().await;
    let file = std::fs::read(LITELLM).unwrap();
    let req = Request::post("/api/v1/prices?format=litellm")
        .header("authorization", format!("Bearer {}", h.admin))
        .body(Body::from(file))
        .unwrap();
    assert_eq!(
        h.router.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    for p in ["acme/cn", "acme/us"] {
        h.admin("POST", "/api/v1/accounts", Some(json!({"path": p})))
            .await;
    }
    let level = json!({
        "name": "sim-gpt",
        "upstream": "sim",
        "model": "gpt-4o*",
        "objectives": [
            {"metric": "availability", "target": "99.9", "credits": [
                {"worse_than": "99.9", "percent": "10"},
                {"worse_than": "99", "percent": "25"}
            ]},
            {"metric": "ttft_p95_ms", "target": "800", "credits": [
                {"worse_than": "800", "percent": "5"}
            ]}
        ],
        "max_credit_percent": "50"
    });
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/contracts/acme/cn",
            Some(json!({"book": "list", "service_levels": [level]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A contract whose level promises nothing is refused, naming the field.
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/contracts/acme/us",
            Some(json!({"book": "list", "service_levels": [{"name": "x", "upstream": "sim", "objectives": []}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("service_levels[0].objectives"),
        "{v}"
    );
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/wallets/acme/cn",
            Some(json!({"kind": "topup", "amount": "100", "currency": "USD"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // November 2026: 200 requests of acme/cn to the sim, 6 failed upstream (97%:
    // the 25% step); TTFT 100 ms but the slowest 5% at 900 ms (p95 = 900 > 800: 5%).
    let mut entries = Vec::new();
    for i in 0..200u32 {
        let status = if i % 33 == 7 { 502 } else { 200 };
        let ttft = if i >= 190 { 900 } else { 100 };
        let at = format!("2026-11-{:02}T{:02}:00:00Z", 1 + i % 30, i % 24);
        entries.push(request(
            &at,
            "acme/cn",
            "sim",
            status,
            ttft,
            "0.01",
            Some("acme/cn"),
        ));
    }
    // Not covered: another upstream, a node priced by no contract, October.
    entries.push(request(
        "2026-11-05T00:00:00Z",
        "acme/cn",
        "other",
        502,
        1,
        "5",
        Some("acme/cn"),
    ));
    entries.push(request(
        "2026-11-05T00:00:00Z",
        "acme/us",
        "sim",
        502,
        1,
        "5",
        None,
    ));
    entries.push(request(
        "2026-10-31T23:00:00Z",
        "acme/cn",
        "sim",
        502,
        1,
        "5",
        Some("acme/cn"),
    ));
    h.app.append_visible(&entries).await.unwrap();

    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/service-levels/acme/cn?period=2026-11",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ev = &v["evaluations"][0]["evaluation"];
    assert_eq!(v["evaluations"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(ev["figures"]["requests"], 200, "{ev}");
    assert_eq!(ev["figures"]["upstream_failures"], 6, "{ev}");
    assert_eq!(ev["objectives"][0]["attained"], "97", "{ev}");
    assert_eq!(ev["objectives"][0]["credit_percent"], "25", "{ev}");
    assert_eq!(ev["objectives"][1]["attained"], "900", "{ev}");
    assert_eq!(ev["objectives"][1]["credit_percent"], "5", "{ev}");
    assert_eq!(ev["credit_percent"], "30", "{ev}");
    // 200 × 0.01 = 2.00 USD billed; 30% = 0.60.
    assert_eq!(ev["credits"][0]["base"], "2", "{ev}");
    assert_eq!(ev["credits"][0]["amount"], "0.6", "{ev}");
    let size = h.app.log.size();

    // Exactly once: by hand again, and by the background task.
    let (s, again) = h
        .admin(
            "POST",
            "/api/v1/service-levels/acme/cn?period=2026-11",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["evaluations"], v["evaluations"]);
    h.app.evaluate_due_service_levels().await.unwrap();
    let (_, list) = h.admin("GET", "/api/v1/service-levels/acme", None).await;
    let nov: Vec<&Value> = list["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["evaluation"]["period"] == "2026-11")
        .collect();
    assert_eq!(nov.len(), 1, "{list}");
    // The background task evaluated the other past months since the contract (none
    // before it): nothing but November carries a credit.
    assert!(
        list["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["evaluation"]["period"] != "2026-11")
            .all(|e| e["evaluation"]["credits"].is_null()),
        "{list}"
    );
    let after = h.app.log.size();
    h.app.evaluate_due_service_levels().await.unwrap();
    assert_eq!(h.app.log.size(), after, "nothing twice");
    assert!(after >= size);

    // Paid into the wallet by one posting that names the evaluation...
    let (_, w) = h.admin("GET", "/api/v1/wallets/acme/cn", None).await;
    assert_eq!(w["wallets"][0]["balance"], "100.6", "{w}");
    let credits: Vec<&Value> = w["movements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "service_credit")
        .collect();
    assert_eq!(credits.len(), 1, "{w}");
    assert_eq!(credits[0]["memo"], "service_level:sim-gpt:2026-11");
    // ...and billed on November's statement as a credit line, in its total.
    let (s, st) = h
        .admin("GET", "/api/v1/statements/acme/cn?period=2026-11", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{st}");
    let credit: Vec<&Value> = st["adjustments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["category"] == "credit")
        .collect();
    assert_eq!(credit.len(), 1, "{st}");
    assert_eq!(credit[0]["key"], "service_credit:sim-gpt");
    assert_eq!(credit[0]["amount"], "-0.6");

    // The quality report of the month, per upstream and model.
    let (s, q) = h
        .admin("GET", "/api/v1/quality?account=acme&period=2026-11", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{q}");
    let rows = q["rows"].as_array().unwrap();
    let sim = rows.iter().find(|r| r["upstream"] == "sim").unwrap();
    assert_eq!(sim["requests"], 201, "{q}");
    assert_eq!(sim["upstream_failures"], 7);
    assert_eq!(sim["ttft_ms"]["p95"], "900");
    assert!(rows.iter().any(|r| r["upstream"] == "other"));
    // A tenant reads its own subtree only.
    let reader = h.key("acme/us", &["read"]).await;
    let (s, _) = h
        .send(
            "GET",
            "/api/v1/quality?account=acme&period=2026-11",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, mine) = h
        .send("GET", "/api/v1/quality?period=2026-11", Some(&reader), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(mine["rows"][0]["requests"], 1, "{mine}");

    // A month not over is refused; a tenant does not evaluate its own contract.
    let this = ciyuan_core::jiff::Timestamp::now()
        .to_zoned(ciyuan_core::jiff::tz::TimeZone::UTC)
        .strftime("%Y-%m")
        .to_string();
    let (s, _) = h
        .admin(
            "POST",
            &format!("/api/v1/service-levels/acme/cn?period={this}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let tenant = h.key("acme/cn", &["admin"]).await;
    let (s, _) = h
        .send(
            "POST",
            "/api/v1/service-levels/acme/cn?period=2026-10",
            Some(&tenant),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
