//! Gateway requests held across the nodes sharing one database.
//!
//! Each node's budget and wallet engines admit a request against what that node knows:
//! its own holds and usage, and every other node's entries it has applied (it follows
//! the ledger). What it cannot know is in this table: the other nodes' requests in
//! flight, and their usage recorded in entries it has not applied yet. A request is
//! admitted only if, on each counter it holds, what its node counts plus what the
//! table holds for the other nodes stays within the amount; the check and the new
//! hold are one statement that first takes a transaction-scoped advisory lock per
//! counter (in the caller's order, sorted), so two nodes never both admit into the
//! same room.
//!
//! A hold lives until every live node has applied the entry that recorded its
//! request's usage (its node says which entry; the heartbeat says how far each node
//! is), or until its node stops heartbeating (killed), or its time to live passes.

use ciyuan_store::{HoldTerm, SettledHold, StoreError};
use rust_decimal::Decimal;

/// The tables and the admission function.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE nodes (
    node     TEXT PRIMARY KEY,
    followed BIGINT NOT NULL,
    seen_at  TIMESTAMPTZ NOT NULL
);
CREATE TABLE holds (
    id         BIGINT NOT NULL,
    counter    TEXT NOT NULL COLLATE "C",
    node       TEXT NOT NULL,
    amount     NUMERIC NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    recorded   BIGINT,
    PRIMARY KEY (id, counter)
);
CREATE INDEX holds_by_counter ON holds (counter);
CREATE FUNCTION ciyuan_reserve(
    p_node TEXT, p_id BIGINT, p_followed BIGINT, p_counters TEXT[],
    p_local NUMERIC[], p_need NUMERIC[], p_amount NUMERIC[], p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (refused INT, elsewhere NUMERIC) LANGUAGE plpgsql AS $$
DECLARE
    i INT;
    other NUMERIC;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_counters, 1), 0) LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(p_counters[i], 0));
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_counters, 1), 0) LOOP
        SELECT coalesce(sum(h.amount), 0) INTO other
        FROM holds h
        WHERE h.counter = p_counters[i] AND h.node <> p_node
          AND (h.recorded >= p_followed
               OR (h.recorded IS NULL AND h.expires_at > now()
                   AND EXISTS (SELECT 1 FROM nodes n WHERE n.node = h.node
                               AND n.seen_at > now() - interval '10 seconds')));
        IF p_local[i] + other > p_amount[i] THEN
            RETURN QUERY SELECT i, other;
            RETURN;
        END IF;
    END LOOP;
    INSERT INTO holds (id, counter, node, amount, expires_at)
    SELECT p_id, c, p_node, n, now() + make_interval(secs => p_ttl_secs)
    FROM unnest(p_counters, p_need) AS t(c, n);
    RETURN QUERY SELECT 0, 0::NUMERIC;
END
$$;
"#;

fn backend(e: postgres::Error) -> StoreError {
    StoreError::Backend(crate::describe(&e))
}

fn decimal(text: &str) -> Result<Decimal, StoreError> {
    Decimal::from_str_exact(text)
        .map_err(|e| StoreError::Corrupt(format!("a held amount {text:?}: {e}")))
}

/// How long a node may go without a heartbeat before its holds in flight lapse (the
/// same interval as in the admission function).
const QUIET: &str = "interval '10 seconds'";

pub(crate) fn heartbeat(
    c: &mut postgres::Client,
    node: &str,
    followed: u64,
) -> Result<(), StoreError> {
    let followed = followed as i64;
    c.execute(
        "INSERT INTO nodes (node, followed, seen_at) VALUES ($1, $2, now())
         ON CONFLICT (node) DO UPDATE SET followed = EXCLUDED.followed, seen_at = now()",
        &[&node, &followed],
    )
    .map_err(backend)?;
    // Recorded usage every live node has applied; holds of requests that died with
    // their node, or outlived their time.
    c.batch_execute(&format!(
        "DELETE FROM holds WHERE recorded < (SELECT min(followed) FROM nodes
                                             WHERE seen_at > now() - {QUIET})
            OR (recorded IS NULL AND (expires_at <= now() OR node NOT IN
                (SELECT node FROM nodes WHERE seen_at > now() - {QUIET})));
         DELETE FROM nodes WHERE seen_at < now() - interval '1 day';"
    ))
    .map_err(backend)
}

pub(crate) fn reserve(
    c: &mut postgres::Client,
    node: &str,
    id: i64,
    followed: u64,
    terms: &[HoldTerm],
    ttl: std::time::Duration,
) -> Result<Option<(usize, Decimal)>, StoreError> {
    // Locks are taken in one order on every node: no two admissions wait on each
    // other in a cycle.
    let mut order: Vec<usize> = (0..terms.len()).collect();
    order.sort_by(|&a, &b| terms[a].counter.cmp(&terms[b].counter));
    let counters: Vec<&str> = order.iter().map(|&i| terms[i].counter.as_str()).collect();
    let local: Vec<String> = order.iter().map(|&i| terms[i].local.to_string()).collect();
    let need: Vec<String> = order.iter().map(|&i| terms[i].need.to_string()).collect();
    let amount: Vec<String> = order.iter().map(|&i| terms[i].amount.to_string()).collect();
    let row = c
        .query_one(
            "SELECT refused, elsewhere::text FROM ciyuan_reserve($1, $2, $3, $4,
                 $5::text[]::numeric[], $6::text[]::numeric[], $7::text[]::numeric[], $8)",
            &[
                &node,
                &id,
                &(followed as i64),
                &counters,
                &local,
                &need,
                &amount,
                &ttl.as_secs_f64(),
            ],
        )
        .map_err(backend)?;
    let refused: i32 = row.get(0);
    if refused == 0 {
        return Ok(None);
    }
    let at = order
        .get(refused as usize - 1)
        .copied()
        .ok_or_else(|| StoreError::Corrupt(format!("a refusal at term {refused}")))?;
    Ok(Some((at, decimal(row.get(1))?)))
}

pub(crate) fn settle(c: &mut postgres::Client, settled: &[SettledHold]) -> Result<(), StoreError> {
    let (mut ids, mut counters, mut amounts, mut entries) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in settled {
        for (counter, actual) in &s.actual {
            ids.push(s.id);
            counters.push(counter.as_str());
            amounts.push(actual.to_string());
            entries.push(s.entry as i64);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    // What the request counts: its usage, or the hold where that was more (a
    // settled hold errs on the side of the limit until every node has its entry).
    c.execute(
        "UPDATE holds h SET recorded = t.entry, amount = greatest(h.amount, t.actual)
         FROM unnest($1::bigint[], $2::text[], $3::text[]::numeric[], $4::bigint[])
              AS t(id, counter, actual, entry)
         WHERE h.id = t.id AND h.counter = t.counter",
        &[&ids, &counters, &amounts, &entries],
    )
    .map_err(backend)?;
    Ok(())
}

pub(crate) fn release(c: &mut postgres::Client, id: i64) -> Result<(), StoreError> {
    c.execute("DELETE FROM holds WHERE id = $1", &[&id])
        .map_err(backend)?;
    Ok(())
}

/// A barrier not lowered this long after it was raised is taken as abandoned (its
/// node died mid-change).
const BARRIER_STALE: &str = "interval '30 seconds'";

pub(crate) fn raise_barrier(
    c: &mut postgres::Client,
    node: &str,
    id: i64,
) -> Result<bool, StoreError> {
    let raised = c
        .query_opt(
            &format!(
                "INSERT INTO rules_barrier (id, node, raised) VALUES ($1, $2, now())
                 ON CONFLICT (one) DO UPDATE
                     SET id = EXCLUDED.id, node = EXCLUDED.node, raised = now(),
                         lowered = false, size = NULL
                 WHERE rules_barrier.lowered OR rules_barrier.raised < now() - {BARRIER_STALE}
                 RETURNING id"
            ),
            &[&id, &node],
        )
        .map_err(backend)?;
    Ok(raised.is_some())
}

pub(crate) fn unpaused(
    c: &mut postgres::Client,
    node: &str,
    id: i64,
) -> Result<Vec<String>, StoreError> {
    let rows = c
        .query(
            &format!(
                "SELECT node FROM nodes WHERE node <> $1 AND seen_at > now() - {QUIET}
                 AND paused IS DISTINCT FROM $2 ORDER BY node"
            ),
            &[&node, &id],
        )
        .map_err(backend)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub(crate) fn pause(c: &mut postgres::Client, node: &str, id: i64) -> Result<(), StoreError> {
    c.execute(
        "UPDATE nodes SET paused = $2 WHERE node = $1",
        &[&node, &id],
    )
    .map_err(backend)?;
    Ok(())
}

pub(crate) fn lower_barrier(
    c: &mut postgres::Client,
    id: i64,
    size: Option<u64>,
) -> Result<(), StoreError> {
    let size = size.map(|s| s as i64);
    c.execute(
        "UPDATE rules_barrier SET lowered = true, size = $2 WHERE id = $1",
        &[&id, &size],
    )
    .map_err(backend)?;
    Ok(())
}

pub(crate) fn barrier(
    c: &mut postgres::Client,
) -> Result<Option<ciyuan_store::Barrier>, StoreError> {
    let row = c
        .query_opt(
            &format!(
                "SELECT id, node, lowered, size FROM rules_barrier
                 WHERE lowered OR raised >= now() - {BARRIER_STALE}"
            ),
            &[],
        )
        .map_err(backend)?;
    Ok(row.map(|r| ciyuan_store::Barrier {
        id: r.get(0),
        node: r.get(1),
        lowered: r
            .get::<_, bool>(2)
            .then(|| r.get::<_, Option<i64>>(3).map(|s| s as u64)),
    }))
}
