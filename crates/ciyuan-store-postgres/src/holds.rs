//! Gateway requests held across the nodes sharing one database.
//!
//! Each node's budget and wallet engines admit a request against what that node knows:
//! its own holds and usage, and every other node's entries it has applied (it follows
//! the ledger). The database then holds it too: a request is admitted only if, on each
//! counter it holds, the usage its node has counted, plus every live node's requests
//! in flight (its own node's included: they race as much), plus the other nodes' usage
//! recorded in entries its node has not applied yet, plus the request, stays within
//! the amount; the check and the new hold are one statement that first takes a
//! transaction-scoped advisory lock per counter (sorted, the same order on every
//! node), so no two requests, of one node or of two, both admit into the same room.
//!
//! A hold lives until every live node has applied the entry that recorded its
//! request's usage (its node says which entry; the heartbeat says how far each node
//! is), or until its node has not heartbeated for a minute (killed: its requests died
//! with it), or its time to live passes. A node whose own heartbeat is 5 s old holds
//! nothing more (the others may be about to take it for dead).
//!
//! Holds commit without waiting for the WAL's flush (`synchronous_commit = off` for
//! their transactions only): with every request of every node on one hot counter,
//! each hold keeps the counter's lock until its commit, and a flush per hold limited a
//! counter to ~300 holds a second (`ciyuan bench admission`). What this gives up: a
//! crash of PostgreSQL itself may forget the holds of the last moments, so requests
//! in flight then go uncounted until their usage is recorded (the ledger's own
//! appends stay synchronous: nothing acknowledged is lost).

use ciyuan_store::{HoldTerm, SettledHold, SliceAsk, SliceSize, StoreError};
use rust_decimal::Decimal;

/// The tables and the admission function.
pub(crate) const MIGRATION: &str = r#"
CREATE TABLE nodes (
    node     TEXT PRIMARY KEY,
    followed BIGINT NOT NULL,
    -- What it said the heartbeat before: a request judged now may have read its
    -- counts that long ago.
    followed_before BIGINT NOT NULL,
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
-- In flight (recorded IS NULL) and recorded after a point: two ranges of one index.
CREATE INDEX holds_by_counter ON holds (counter, recorded);
CREATE FUNCTION ciyuan_reserve_many(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_need NUMERIC[], p_amount NUMERIC[], p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (id BIGINT, refused INT, elsewhere NUMERIC) LANGUAGE plpgsql AS $$
-- The terms of each request are consecutive in the arrays (`p_ids` says whose); the
-- requests are judged in that order, each seeing the holds of those before it.
DECLARE
    c TEXT;
    n INT := coalesce(array_length(p_counters, 1), 0);
    counters TEXT[];
    held NUMERIC[];
    live TEXT[];
    i INT;
    j INT;
    k INT;
    first INT := 1;
    bad INT;
    recorded NUMERIC;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF NOT EXISTS (SELECT 1 FROM nodes WHERE node = p_node
                   AND seen_at > now() - interval '5 seconds') THEN
        RETURN QUERY SELECT DISTINCT t.id, -1, 0::NUMERIC FROM unnest(p_ids) AS t(id);
        RETURN;
    END IF;
    -- Each counter's lock once, in one order on every node.
    SELECT array_agg(x ORDER BY x) INTO counters
    FROM (SELECT DISTINCT x COLLATE "C" AS x FROM unnest(p_counters) AS u(x)) AS d;
    FOREACH c IN ARRAY coalesce(counters, '{}') LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(c, 0));
    END LOOP;
    SELECT coalesce(array_agg(node), '{}') INTO live
    FROM nodes WHERE seen_at > now() - interval '60 seconds';
    -- What is held on each counter now: every live node's requests in flight, and
    -- the other nodes' usage this node has not applied.
    held := '{}';
    FOR k IN 1 .. coalesce(array_length(counters, 1), 0) LOOP
        SELECT coalesce(sum(h.amount), 0) INTO recorded FROM holds h
        WHERE h.counter = counters[k] AND h.recorded IS NULL
          AND h.node = ANY(live) AND h.expires_at > now();
        held := held || recorded;
        SELECT coalesce(sum(h.amount), 0) INTO recorded FROM holds h
        WHERE h.counter = counters[k]
          AND ((h.node <> p_node AND h.recorded >= p_followed)
               OR (h.node = p_node AND h.recorded >= p_own_from));
        held[k] := held[k] + recorded;
    END LOOP;
    i := 1;
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_ids[j + 1] = p_ids[i] LOOP
            j := j + 1;
        END LOOP;
        -- Terms i..j are one request's.
        bad := 0;
        FOR k IN i .. j LOOP
            IF p_local[k] + held[array_position(counters, p_counters[k])] + p_need[k]
               > p_amount[k] THEN
                bad := k;
                EXIT;
            END IF;
        END LOOP;
        IF bad = 0 THEN
            FOR k IN i .. j LOOP
                held[array_position(counters, p_counters[k])] :=
                    held[array_position(counters, p_counters[k])] + p_need[k];
            END LOOP;
            INSERT INTO holds (id, counter, node, amount, expires_at)
            SELECT p_ids[i], p_counters[g.x], p_node, p_need[g.x],
                   now() + make_interval(secs => p_ttl_secs)
            FROM generate_series(i, j) AS g(x);
            RETURN QUERY SELECT p_ids[i], 0, 0::NUMERIC;
        ELSE
            RETURN QUERY SELECT p_ids[i], bad - i + 1,
                held[array_position(counters, p_counters[bad])];
        END IF;
        i := j + 1;
    END LOOP;
END
$$;
CREATE FUNCTION ciyuan_settle(
    p_ids BIGINT[], p_counters TEXT[], p_actual NUMERIC[], p_entries BIGINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE holds h SET recorded = t.entry, amount = greatest(h.amount, t.actual)
    FROM unnest(p_ids, p_counters, p_actual, p_entries) AS t(id, counter, actual, entry)
    WHERE h.id = t.id AND h.counter = t.counter;
END
$$;
CREATE FUNCTION ciyuan_release(p_id BIGINT) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM holds WHERE id = p_id;
END
$$;
"#;

/// Slices of a counter's room (`Store::reserve_slices`): what is held on a counter, as
/// a node counts it, becomes one function both admissions use.
pub(crate) const MIGRATION_SLICES: &str = r#"
CREATE FUNCTION ciyuan_held(
    p_counter TEXT, p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_live TEXT[]
) RETURNS NUMERIC LANGUAGE sql STABLE AS $$
    -- Every live node's requests (and slices) in flight, and the usage recorded in
    -- entries the asking node may not have counted.
    SELECT (SELECT coalesce(sum(h.amount), 0) FROM holds h
            WHERE h.counter = p_counter AND h.recorded IS NULL
              AND h.node = ANY(p_live) AND h.expires_at > now())
         + (SELECT coalesce(sum(h.amount), 0) FROM holds h
            WHERE h.counter = p_counter
              AND ((h.node <> p_node AND h.recorded >= p_followed)
                   OR (h.node = p_node AND h.recorded >= p_own_from)))
$$;
-- What both admissions start with: the node's heartbeat checked (`counters` NULL when
-- it is 5 s old: the others may be about to take the node for dead), each counter's
-- lock taken once in one order on every node, and what is held on each counter.
CREATE FUNCTION ciyuan_counted(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_counters TEXT[],
    OUT counters TEXT[], OUT held NUMERIC[], OUT live_nodes INT
) LANGUAGE plpgsql AS $$
DECLARE
    c TEXT;
    live TEXT[];
    k INT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF NOT EXISTS (SELECT 1 FROM nodes WHERE node = p_node
                   AND seen_at > now() - interval '5 seconds') THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO counters
    FROM (SELECT DISTINCT x COLLATE "C" AS x FROM unnest(p_counters) AS u(x)) AS d;
    FOREACH c IN ARRAY counters LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(c, 0));
    END LOOP;
    SELECT coalesce(array_agg(node), '{}') INTO live
    FROM nodes WHERE seen_at > now() - interval '60 seconds';
    live_nodes := coalesce(array_length(live, 1), 0);
    held := '{}';
    FOR k IN 1 .. coalesce(array_length(counters, 1), 0) LOOP
        held := held || ciyuan_held(counters[k], p_node, p_followed, p_own_from, live);
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION ciyuan_reserve_many(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_need NUMERIC[], p_amount NUMERIC[], p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (id BIGINT, refused INT, elsewhere NUMERIC) LANGUAGE plpgsql AS $$
DECLARE
    n INT := coalesce(array_length(p_counters, 1), 0);
    counters TEXT[];
    held NUMERIC[];
    live_nodes INT;
    i INT;
    j INT;
    k INT;
    bad INT;
BEGIN
    SELECT * INTO counters, held, live_nodes
    FROM ciyuan_counted(p_node, p_followed, p_own_from, p_counters);
    IF counters IS NULL THEN
        RETURN QUERY SELECT DISTINCT t.id, -1, 0::NUMERIC FROM unnest(p_ids) AS t(id);
        RETURN;
    END IF;
    i := 1;
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_ids[j + 1] = p_ids[i] LOOP
            j := j + 1;
        END LOOP;
        bad := 0;
        FOR k IN i .. j LOOP
            IF p_local[k] + held[array_position(counters, p_counters[k])] + p_need[k]
               > p_amount[k] THEN
                bad := k;
                EXIT;
            END IF;
        END LOOP;
        IF bad = 0 THEN
            FOR k IN i .. j LOOP
                held[array_position(counters, p_counters[k])] :=
                    held[array_position(counters, p_counters[k])] + p_need[k];
            END LOOP;
            INSERT INTO holds (id, counter, node, amount, expires_at)
            SELECT p_ids[i], p_counters[g.x], p_node, p_need[g.x],
                   now() + make_interval(secs => p_ttl_secs)
            FROM generate_series(i, j) AS g(x);
            RETURN QUERY SELECT p_ids[i], 0, 0::NUMERIC;
        ELSE
            RETURN QUERY SELECT p_ids[i], bad - i + 1,
                held[array_position(counters, p_counters[bad])];
        END IF;
        i := j + 1;
    END LOOP;
END
$$;
CREATE FUNCTION ciyuan_reserve_slices(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_least NUMERIC[], p_want NUMERIC[], p_amount NUMERIC[],
    p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (id BIGINT, granted NUMERIC) LANGUAGE plpgsql AS $$
-- Granted: what was held; NULL: refused; -1: the node has not heartbeated.
DECLARE
    n INT := coalesce(array_length(p_counters, 1), 0);
    counters TEXT[];
    held NUMERIC[];
    live_nodes INT;
    k INT;
    at INT;
    room NUMERIC;
    g NUMERIC;
BEGIN
    SELECT * INTO counters, held, live_nodes
    FROM ciyuan_counted(p_node, p_followed, p_own_from, p_counters);
    IF counters IS NULL THEN
        RETURN QUERY SELECT t.id, -1::NUMERIC FROM unnest(p_ids) AS t(id);
        RETURN;
    END IF;
    FOR k IN 1 .. n LOOP
        at := array_position(counters, p_counters[k]);
        room := p_amount[k] - p_local[k] - held[at];
        -- A share of the room (twice the live nodes' count: one node never takes
        -- it all), in the unit's own scale, never above what was asked.
        g := least(p_want[k], trunc(room / (2 * greatest(live_nodes, 1)), scale(p_least[k])));
        IF g > 0 AND g >= p_least[k] AND g <= room THEN
            held[at] := held[at] + g;
            INSERT INTO holds (id, counter, node, amount, expires_at)
            VALUES (p_ids[k], p_counters[k], p_node, g,
                    now() + make_interval(secs => p_ttl_secs));
            RETURN QUERY SELECT p_ids[k], g;
        ELSE
            RETURN QUERY SELECT p_ids[k], NULL::NUMERIC;
        END IF;
    END LOOP;
END
$$;
CREATE FUNCTION ciyuan_resize_slices(
    p_ids BIGINT[], p_counters TEXT[], p_amounts NUMERIC[], p_recorded BIGINT[]
) RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM holds h
    USING unnest(p_ids, p_counters, p_amounts) AS t(id, counter, amount)
    WHERE h.id = t.id AND h.counter = t.counter AND t.amount = 0;
    UPDATE holds h SET amount = t.amount, recorded = t.recorded
    FROM unnest(p_ids, p_counters, p_amounts, p_recorded) AS t(id, counter, amount, recorded)
    WHERE h.id = t.id AND h.counter = t.counter AND t.amount <> 0;
END
$$;
"#;

/// Holds a node counts already (`Store::reserve_many`'s `counted`): a request's usage
/// is counted by its node's engines as it ends, and its hold here until its entry is
/// appended and the hold settled (a few milliseconds later); the asking node names
/// those of its holds, which are then not counted again. The functions take the list
/// as a last argument; those of the build before call them with none.
pub(crate) const MIGRATION_COUNTED: &str = r#"
CREATE OR REPLACE FUNCTION ciyuan_held(
    p_counter TEXT, p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_live TEXT[],
    p_counted BIGINT[]
) RETURNS NUMERIC LANGUAGE sql STABLE AS $$
    -- Every live node's requests (and slices) in flight, and the usage recorded in
    -- entries the asking node may not have counted; the asking node's holds it
    -- counts already (`p_counted`) neither way.
    SELECT (SELECT coalesce(sum(h.amount), 0) FROM holds h
            WHERE h.counter = p_counter AND h.recorded IS NULL
              AND h.node = ANY(p_live) AND h.expires_at > now()
              AND NOT (h.node = p_node AND h.id = ANY(p_counted)))
         + (SELECT coalesce(sum(h.amount), 0) FROM holds h
            WHERE h.counter = p_counter
              AND ((h.node <> p_node AND h.recorded >= p_followed)
                   OR (h.node = p_node AND h.recorded >= p_own_from
                       AND NOT h.id = ANY(p_counted))))
$$;
CREATE OR REPLACE FUNCTION ciyuan_held(
    p_counter TEXT, p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_live TEXT[]
) RETURNS NUMERIC LANGUAGE sql STABLE AS $$
    SELECT ciyuan_held(p_counter, p_node, p_followed, p_own_from, p_live, '{}'::BIGINT[])
$$;
CREATE OR REPLACE FUNCTION ciyuan_counted(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_counters TEXT[], p_counted BIGINT[],
    OUT counters TEXT[], OUT held NUMERIC[], OUT live_nodes INT
) LANGUAGE plpgsql AS $$
DECLARE
    c TEXT;
    live TEXT[];
    k INT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF NOT EXISTS (SELECT 1 FROM nodes WHERE node = p_node
                   AND seen_at > now() - interval '5 seconds') THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO counters
    FROM (SELECT DISTINCT x COLLATE "C" AS x FROM unnest(p_counters) AS u(x)) AS d;
    FOREACH c IN ARRAY counters LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(c, 0));
    END LOOP;
    SELECT coalesce(array_agg(node), '{}') INTO live
    FROM nodes WHERE seen_at > now() - interval '60 seconds';
    live_nodes := coalesce(array_length(live, 1), 0);
    held := '{}';
    FOR k IN 1 .. coalesce(array_length(counters, 1), 0) LOOP
        held := held || ciyuan_held(counters[k], p_node, p_followed, p_own_from, live,
                                    p_counted);
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION ciyuan_counted(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_counters TEXT[],
    OUT counters TEXT[], OUT held NUMERIC[], OUT live_nodes INT
) LANGUAGE sql AS $$
    SELECT * FROM ciyuan_counted(p_node, p_followed, p_own_from, p_counters, '{}'::BIGINT[])
$$;
-- Admission as before (migration 9), each counter's hold counted by
-- `ciyuan_counted` with the holds the node counts already left out.
CREATE OR REPLACE FUNCTION ciyuan_reserve_many(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_need NUMERIC[], p_amount NUMERIC[], p_ttl_secs DOUBLE PRECISION,
    p_counted BIGINT[]
) RETURNS TABLE (id BIGINT, refused INT, elsewhere NUMERIC) LANGUAGE plpgsql AS $$
DECLARE
    n INT := coalesce(array_length(p_counters, 1), 0);
    counters TEXT[];
    held NUMERIC[];
    live_nodes INT;
    i INT;
    j INT;
    k INT;
    bad INT;
BEGIN
    SELECT * INTO counters, held, live_nodes
    FROM ciyuan_counted(p_node, p_followed, p_own_from, p_counters, p_counted);
    IF counters IS NULL THEN
        RETURN QUERY SELECT DISTINCT t.id, -1, 0::NUMERIC FROM unnest(p_ids) AS t(id);
        RETURN;
    END IF;
    i := 1;
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_ids[j + 1] = p_ids[i] LOOP
            j := j + 1;
        END LOOP;
        bad := 0;
        FOR k IN i .. j LOOP
            IF p_local[k] + held[array_position(counters, p_counters[k])] + p_need[k]
               > p_amount[k] THEN
                bad := k;
                EXIT;
            END IF;
        END LOOP;
        IF bad = 0 THEN
            FOR k IN i .. j LOOP
                held[array_position(counters, p_counters[k])] :=
                    held[array_position(counters, p_counters[k])] + p_need[k];
            END LOOP;
            INSERT INTO holds (id, counter, node, amount, expires_at)
            SELECT p_ids[i], p_counters[g.x], p_node, p_need[g.x],
                   now() + make_interval(secs => p_ttl_secs)
            FROM generate_series(i, j) AS g(x);
            RETURN QUERY SELECT p_ids[i], 0, 0::NUMERIC;
        ELSE
            RETURN QUERY SELECT p_ids[i], bad - i + 1,
                held[array_position(counters, p_counters[bad])];
        END IF;
        i := j + 1;
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION ciyuan_reserve_many(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_need NUMERIC[], p_amount NUMERIC[], p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (id BIGINT, refused INT, elsewhere NUMERIC) LANGUAGE sql AS $$
    SELECT * FROM ciyuan_reserve_many(p_node, p_followed, p_own_from, p_ids, p_counters,
        p_local, p_need, p_amount, p_ttl_secs, '{}'::BIGINT[])
$$;
CREATE OR REPLACE FUNCTION ciyuan_reserve_slices(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_least NUMERIC[], p_want NUMERIC[], p_amount NUMERIC[],
    p_ttl_secs DOUBLE PRECISION, p_counted BIGINT[]
) RETURNS TABLE (id BIGINT, granted NUMERIC) LANGUAGE plpgsql AS $$
-- Granted: what was held; NULL: refused; -1: the node has not heartbeated.
DECLARE
    n INT := coalesce(array_length(p_counters, 1), 0);
    counters TEXT[];
    held NUMERIC[];
    live_nodes INT;
    k INT;
    at INT;
    room NUMERIC;
    g NUMERIC;
BEGIN
    SELECT * INTO counters, held, live_nodes
    FROM ciyuan_counted(p_node, p_followed, p_own_from, p_counters, p_counted);
    IF counters IS NULL THEN
        RETURN QUERY SELECT t.id, -1::NUMERIC FROM unnest(p_ids) AS t(id);
        RETURN;
    END IF;
    FOR k IN 1 .. n LOOP
        at := array_position(counters, p_counters[k]);
        room := p_amount[k] - p_local[k] - held[at];
        g := least(p_want[k], trunc(room / (2 * greatest(live_nodes, 1)), scale(p_least[k])));
        IF g > 0 AND g >= p_least[k] AND g <= room THEN
            held[at] := held[at] + g;
            INSERT INTO holds (id, counter, node, amount, expires_at)
            VALUES (p_ids[k], p_counters[k], p_node, g,
                    now() + make_interval(secs => p_ttl_secs));
            RETURN QUERY SELECT p_ids[k], g;
        ELSE
            RETURN QUERY SELECT p_ids[k], NULL::NUMERIC;
        END IF;
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION ciyuan_reserve_slices(
    p_node TEXT, p_followed BIGINT, p_own_from BIGINT, p_ids BIGINT[], p_counters TEXT[],
    p_local NUMERIC[], p_least NUMERIC[], p_want NUMERIC[], p_amount NUMERIC[],
    p_ttl_secs DOUBLE PRECISION
) RETURNS TABLE (id BIGINT, granted NUMERIC) LANGUAGE sql AS $$
    SELECT * FROM ciyuan_reserve_slices(p_node, p_followed, p_own_from, p_ids, p_counters,
        p_local, p_least, p_want, p_amount, p_ttl_secs, '{}'::BIGINT[])
$$;
"#;

/// Named leases, one node at a time, handed over when another waits
/// (`Store::take_lease`): tier counters are placed by one node at a time.
pub(crate) const MIGRATION_LEASES: &str = r#"
CREATE TABLE leases (
    name      TEXT PRIMARY KEY,
    node      TEXT NOT NULL,
    until     TIMESTAMPTZ NOT NULL,
    since     TIMESTAMPTZ NOT NULL,
    wanted_by TEXT
);
CREATE FUNCTION ciyuan_take_lease(
    p_name TEXT, p_node TEXT, p_term DOUBLE PRECISION, p_share DOUBLE PRECISION
) RETURNS INT LANGUAGE plpgsql AS $$
-- 1: kept; 2: taken; 0: busy.
DECLARE
    r leases%ROWTYPE;
BEGIN
    SELECT * INTO r FROM leases WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO leases (name, node, until, since)
        VALUES (p_name, p_node, now() + make_interval(secs => p_term), now())
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            RETURN 2;
        END IF;
        RETURN 0;
    END IF;
    IF r.until <= now() THEN
        UPDATE leases SET node = p_node, until = now() + make_interval(secs => p_term),
                          since = now(), wanted_by = NULL
        WHERE name = p_name;
        -- Lapsed or let go by the caller itself: nobody held it since.
        IF r.node = p_node THEN
            RETURN 1;
        END IF;
        RETURN 2;
    END IF;
    IF r.node = p_node THEN
        IF r.wanted_by IS NOT NULL AND r.wanted_by <> p_node
           AND r.since <= now() - make_interval(secs => p_share) THEN
            UPDATE leases SET until = now(), wanted_by = NULL WHERE name = p_name;
            RETURN 0;
        END IF;
        UPDATE leases SET until = now() + make_interval(secs => p_term) WHERE name = p_name;
        RETURN 1;
    END IF;
    UPDATE leases SET wanted_by = p_node WHERE name = p_name AND wanted_by IS NULL;
    RETURN 0;
END
$$;
"#;

pub(crate) fn take_lease(
    c: &mut postgres::Client,
    name: &str,
    node: &str,
    term: std::time::Duration,
    share: std::time::Duration,
) -> Result<ciyuan_store::LeaseTaken, StoreError> {
    let got: i32 = c
        .query_one(
            "SELECT ciyuan_take_lease($1, $2, $3, $4)",
            &[&name, &node, &term.as_secs_f64(), &share.as_secs_f64()],
        )
        .map_err(backend)?
        .get(0);
    Ok(match got {
        1 => ciyuan_store::LeaseTaken::Kept,
        2 => ciyuan_store::LeaseTaken::Taken,
        _ => ciyuan_store::LeaseTaken::Busy,
    })
}

pub(crate) fn drop_lease(
    c: &mut postgres::Client,
    name: &str,
    node: &str,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE leases SET until = now() WHERE name = $1 AND node = $2 AND until > now()",
        &[&name, &node],
    )
    .map_err(backend)?;
    Ok(())
}

fn backend(e: postgres::Error) -> StoreError {
    StoreError::Backend(crate::describe(&e))
}

fn decimal(text: &str) -> Result<Decimal, StoreError> {
    Decimal::from_str_exact(text)
        .map_err(|e| StoreError::Corrupt(format!("a held amount {text:?}: {e}")))
}

/// How long a node may go without a heartbeat before the others stop waiting for it at
/// a rules barrier (it fences its own rating after 5 s).
const QUIET: &str = "interval '10 seconds'";

pub(crate) fn heartbeat(
    c: &mut postgres::Client,
    node: &str,
    followed: u64,
) -> Result<(), StoreError> {
    let followed = followed as i64;
    c.execute(
        "INSERT INTO nodes (node, followed, followed_before, seen_at) VALUES ($1, $2, $2, now())
         ON CONFLICT (node) DO UPDATE
             SET followed_before = nodes.followed, followed = EXCLUDED.followed,
                 seen_at = now()",
        &[&node, &followed],
    )
    .map_err(backend)?;
    // Recorded usage every live node has applied; holds of requests that died with
    // their node, or outlived their time.
    c.batch_execute(
        "DELETE FROM holds WHERE recorded < (SELECT min(followed_before) FROM nodes
                                             WHERE seen_at > now() - interval '60 seconds')
            OR (recorded IS NULL AND (expires_at <= now() OR node NOT IN
                (SELECT node FROM nodes WHERE seen_at > now() - interval '60 seconds')));
         DELETE FROM nodes WHERE seen_at < now() - interval '1 day';",
    )
    .map_err(backend)
}

pub(crate) fn leave(c: &mut postgres::Client, node: &str) -> Result<(), StoreError> {
    // Its settled holds stay until every node has followed their entries.
    c.execute(
        "DELETE FROM holds WHERE node = $1 AND recorded IS NULL",
        &[&node],
    )
    .map_err(backend)?;
    c.execute("DELETE FROM nodes WHERE node = $1", &[&node])
        .map_err(backend)?;
    Ok(())
}

/// Holds several requests of `node` in one call (see `Store::reserve_many`).
pub(crate) fn reserve_many(
    c: &mut postgres::Client,
    node: &str,
    seen: ciyuan_store::Seen,
    counted: &[i64],
    requests: &[(i64, &[HoldTerm])],
    ttl: std::time::Duration,
) -> Result<Vec<Option<(usize, Decimal)>>, StoreError> {
    let (mut ids, mut counters, mut local, mut need, mut amount) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, terms) in requests {
        if terms.is_empty() {
            return Err(StoreError::Corrupt(format!("hold {id} holds nothing")));
        }
        for t in terms.iter() {
            ids.push(*id);
            counters.push(t.counter.as_str());
            local.push(t.local.to_string());
            need.push(t.need.to_string());
            amount.push(t.amount.to_string());
        }
    }
    let rows = c
        .query(
            "SELECT id, refused, elsewhere::text FROM ciyuan_reserve_many($1, $2, $3, $4, $5,
                 $6::text[]::numeric[], $7::text[]::numeric[], $8::text[]::numeric[], $9,
                 $10)",
            &[
                &node,
                &(seen.followed as i64),
                &(seen.own_from as i64),
                &ids,
                &counters,
                &local,
                &need,
                &amount,
                &ttl.as_secs_f64(),
                &counted,
            ],
        )
        .map_err(backend)?;
    let mut answers = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        let refused: i32 = r.get(1);
        if refused < 0 {
            return Err(StoreError::Unavailable(format!(
                "node {node} has not heartbeated for 5 s: it holds nothing until it does"
            )));
        }
        let answer = if refused == 0 {
            None
        } else {
            Some((refused as usize - 1, decimal(r.get(2))?))
        };
        answers.insert(r.get::<_, i64>(0), answer);
    }
    requests
        .iter()
        .map(|(id, _)| {
            answers
                .remove(id)
                .ok_or_else(|| StoreError::Corrupt(format!("no answer for hold {id}")))
        })
        .collect()
}

/// Holds slices for `node` (see `Store::reserve_slices`).
pub(crate) fn reserve_slices(
    c: &mut postgres::Client,
    node: &str,
    seen: ciyuan_store::Seen,
    counted: &[i64],
    asks: &[SliceAsk],
    ttl: std::time::Duration,
) -> Result<Vec<Option<Decimal>>, StoreError> {
    let (mut ids, mut counters, mut local, mut least, mut want, mut amount) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for a in asks {
        ids.push(a.id);
        counters.push(a.term.counter.as_str());
        local.push(a.term.local.to_string());
        least.push(a.least.to_string());
        want.push(a.term.need.to_string());
        amount.push(a.term.amount.to_string());
    }
    let rows = c
        .query(
            "SELECT id, granted::text FROM ciyuan_reserve_slices($1, $2, $3, $4, $5,
                 $6::text[]::numeric[], $7::text[]::numeric[], $8::text[]::numeric[],
                 $9::text[]::numeric[], $10, $11)",
            &[
                &node,
                &(seen.followed as i64),
                &(seen.own_from as i64),
                &ids,
                &counters,
                &local,
                &least,
                &want,
                &amount,
                &ttl.as_secs_f64(),
                &counted,
            ],
        )
        .map_err(backend)?;
    if rows.len() != asks.len() {
        return Err(StoreError::Corrupt(format!(
            "{} answers for {} slices asked",
            rows.len(),
            asks.len()
        )));
    }
    let mut granted = Vec::with_capacity(rows.len());
    for (r, a) in rows.iter().zip(asks) {
        if r.get::<_, i64>(0) != a.id {
            return Err(StoreError::Corrupt(format!("no answer for slice {}", a.id)));
        }
        granted.push(match r.get::<_, Option<&str>>(1) {
            None => None,
            Some("-1") => {
                return Err(StoreError::Unavailable(format!(
                    "node {node} has not heartbeated for 5 s: it holds nothing until it does"
                )));
            }
            Some(g) => Some(decimal(g)?),
        });
    }
    Ok(granted)
}

pub(crate) fn resize_slices(
    c: &mut postgres::Client,
    sizes: &[SliceSize],
) -> Result<(), StoreError> {
    if sizes.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = sizes.iter().map(|s| s.id).collect();
    let counters: Vec<&str> = sizes.iter().map(|s| s.counter.as_str()).collect();
    let amounts: Vec<String> = sizes.iter().map(|s| s.amount.to_string()).collect();
    let recorded: Vec<Option<i64>> = sizes.iter().map(|s| s.recorded.map(|r| r as i64)).collect();
    c.execute(
        "SELECT ciyuan_resize_slices($1, $2, $3::text[]::numeric[], $4)",
        &[&ids, &counters, &amounts, &recorded],
    )
    .map_err(backend)?;
    Ok(())
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
        "SELECT ciyuan_settle($1, $2, $3::text[]::numeric[], $4)",
        &[&ids, &counters, &amounts, &entries],
    )
    .map_err(backend)?;
    Ok(())
}

pub(crate) fn release(c: &mut postgres::Client, id: i64) -> Result<(), StoreError> {
    c.execute("SELECT ciyuan_release($1)", &[&id])
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
