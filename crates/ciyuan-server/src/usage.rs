//! `/api/v1/usage`: tokens by subtree, dimension and time bucket, from the projections.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{App, parse_path};
use axum::extract::State;
use ciyuan_core::Scope;
use ciyuan_core::jiff::{Timestamp, tz::TimeZone};
use ciyuan_store::tree::{Subtrees, TreeFilter};
use ciyuan_store::{
    Bucket, GroupBy, HourFilter, TokenSums, UsageQuery, aggregate, ceil_hour, floor_hour,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    account: Option<String>,
    group_by: Option<String>,
    bucket: Option<String>,
    from: Option<String>,
    to: Option<String>,
    tz: Option<String>,
    /// `cost`: each row also carries its rated amounts by currency.
    with: Option<String>,
}

#[derive(Serialize)]
struct Row {
    #[serde(skip_serializing_if = "Option::is_none")]
    bucket_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// With `group_by=tag:KEY`: each grouped tag's value (`null`: usage without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<BTreeMap<String, Option<String>>>,
    tokens: Sums,
    /// Exact: sums past `i64` are written as JSON integers of any size.
    total: i128,
    /// With `with=cost`: rated amounts by currency, exact decimal strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<std::collections::BTreeMap<String, String>>,
}

/// Token sums as a JSON object keyed `modality.direction`, like a ledger entry's.
struct Sums(TokenSums);

impl Serialize for Sums {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (m, d, n) in self.0.iter() {
            map.serialize_entry(&format_args!("{m}.{d}").to_string(), &n)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
pub struct Answer {
    account: String,
    group_by: Vec<String>,
    /// The `tag=KEY:VALUE` filters applied, as `KEY:VALUE`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    bucket: Option<&'static str>,
    tz: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<Timestamp>,
    rows: Vec<Row>,
    /// With `with=cost`: the rows' amounts summed by currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_totals: Option<std::collections::BTreeMap<String, String>>,
}

fn parse_time(s: &str, what: &str) -> Result<Timestamp, ApiError> {
    s.parse().map_err(|e| {
        ApiError::bad_request(format!(
            "{what} {s:?} is not an RFC 3339 timestamp such as 2026-11-25T00:00:00Z: {e}"
        ))
    })
}

/// The query's parameters: [`Params`] and the repeatable `tag=KEY:VALUE` filters
/// (the form decoder keeps one value per field, so they are taken out first).
fn params(uri: &axum::http::Uri) -> Result<(Params, BTreeMap<String, String>), ApiError> {
    let pairs: Vec<(String, String)> = axum::extract::Query::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let mut rest = serde_json::Map::new();
    let mut tags = BTreeMap::new();
    for (k, v) in pairs {
        if k == "tag" {
            let (key, value) = v.split_once(':').ok_or_else(|| {
                ApiError::bad_request(format!(
                    "tag {v:?} is not KEY:VALUE (e.g. tag=feature:search)"
                ))
            })?;
            ciyuan_core::check_tag(key, value)
                .map_err(|e| ApiError::bad_request(format!("tag {v:?}: {e}")))?;
            if let Some(old) = tags.insert(key.to_string(), value.to_string())
                && old != value
            {
                return Err(ApiError::bad_request(format!(
                    "tag {key:?} is filtered twice, as {old:?} and {value:?}: a tag has one value"
                )));
            }
        } else if rest
            .insert(k.clone(), serde_json::Value::String(v))
            .is_some()
        {
            return Err(ApiError::bad_request(format!("{k} is given twice")));
        }
    }
    let p = serde_json::from_value(serde_json::Value::Object(rest))
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    Ok((p, tags))
}

pub async fn query(
    State(app): State<Arc<App>>,
    caller: Caller,
    uri: axum::http::Uri,
) -> Result<axum::Json<Answer>, ApiError> {
    caller.require(Scope::Read)?;
    let (p, tag_filter) = params(&uri)?;
    let account = match &p.account {
        Some(s) => parse_path(s, "account")?,
        None => caller.key.account.clone(),
    };
    caller.require_within(&account)?;
    app.caught_up().await?;
    let mut group_by = Vec::new();
    let mut group_names = Vec::new();
    let mut tag_keys: Vec<String> = Vec::new();
    for g in p
        .group_by
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
    {
        if let Some(key) = g.strip_prefix("tag:") {
            ciyuan_core::check_tag(key, "-")
                .map_err(|e| ApiError::bad_request(format!("group_by {g:?}: {e}")))?;
            if !tag_keys.iter().any(|k| k == key) {
                tag_keys.push(key.to_string());
                group_names.push(g.to_string());
            }
            continue;
        }
        let (dim, name) = match g {
            "" => continue,
            "account" => (GroupBy::Account, "account"),
            "child" => (GroupBy::Child, "child"),
            "service" => (GroupBy::Service, "service"),
            "model" => (GroupBy::Model, "model"),
            other => {
                return Err(ApiError::bad_request(format!(
                    "group_by {other:?} is not one of account, child, service, model, tag:KEY"
                )));
            }
        };
        if !group_by.contains(&dim) {
            group_by.push(dim);
            group_names.push(name.to_string());
        }
    }
    if group_by.contains(&GroupBy::Account) && group_by.contains(&GroupBy::Child) {
        return Err(ApiError::bad_request(
            "group_by account and child exclude each other: account splits by every node, \
             child by the node's children's subtrees",
        ));
    }
    let (bucket, bucket_name) = match p.bucket.as_deref() {
        None | Some("none") => (None, None),
        Some("hour") => (Some(Bucket::Hour), Some("hour")),
        Some("day") => (Some(Bucket::Day), Some("day")),
        Some("month") => (Some(Bucket::Month), Some("month")),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "bucket {other:?} is not one of hour, day, month, none"
            )));
        }
    };
    let from = p
        .from
        .as_deref()
        .map(|s| parse_time(s, "from"))
        .transpose()?;
    let to = p.to.as_deref().map(|s| parse_time(s, "to")).transpose()?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(ApiError::bad_request("from must be before to"));
    }
    let tz_given =
        match &p.tz {
            Some(name) => Some(TimeZone::get(name).map_err(|_| {
                ApiError::bad_request(format!("tz {name:?} is not an IANA time zone"))
            })?),
            None => None,
        };
    let filter = HourFilter {
        account: account.clone(),
        // Rollups are hourly: a range is widened to whole UTC hours.
        from_hour: from.map(floor_hour),
        to_hour: to.map(ceil_hour),
    };
    let with_cost = match p.with.as_deref() {
        None | Some("") => false,
        Some("cost") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!("with {other:?} is not cost")));
        }
    };
    // Unless split by every node, the subtree rollups answer: one row per hour (or
    // whole UTC day, where the answer sums the range) of the node or of each child,
    // not every descendant's rows.
    let tree = (!group_by.contains(&GroupBy::Account)).then(|| TreeFilter {
        subtrees: if group_by.contains(&GroupBy::Child) {
            Subtrees::ChildrenOf(account.clone())
        } else {
            Subtrees::Of(account.clone())
        },
        from_hour: filter.from_hour,
        to_hour: filter.to_hour,
        days: bucket.is_none(),
    });
    let acct = account.clone();
    let by_tag = !tag_keys.is_empty() || !tag_filter.is_empty();
    let tag_hours = filter.clone();
    // Not bucketed: the range's sums are all the answer needs.
    let whole = bucket.is_none();
    let (tagged, tagged_costs) = if by_tag {
        app.blocking(move |app| {
            let store = app.store.as_ref();
            Ok((
                store.tag_usage_hours(&tag_hours, whole)?,
                if with_cost {
                    store.tag_cost_hours(&tag_hours, whole)?
                } else {
                    Vec::new()
                },
            ))
        })
        .await?
    } else {
        (Vec::new(), Vec::new())
    };
    // Filtered by tags, every row is tagged: the untagged rollups are not read.
    let read_all = tag_filter.is_empty();
    let (rows, costs, tz): (Vec<_>, Vec<_>, _) = app
        .blocking(move |app| {
            let tz = match tz_given {
                Some(tz) => tz,
                None => ciyuan_store::effective_time_zone(app.store.as_ref(), &acct)?,
            };
            if !read_all {
                return Ok((Vec::new(), Vec::new(), tz));
            }
            let store = app.store.as_ref();
            Ok(match &tree {
                Some(tree) => (
                    store.usage_tree(tree)?,
                    if with_cost {
                        store.cost_tree(tree)?
                    } else {
                        Vec::new()
                    },
                    tz,
                ),
                None => (
                    store.usage_hours(&filter)?,
                    if with_cost {
                        store.cost_hours(&filter)?
                    } else {
                        Vec::new()
                    },
                    tz,
                ),
            })
        })
        .await?;
    let tz_name = tz.iana_name().unwrap_or("UTC").to_string();
    let q = UsageQuery {
        account: account.clone(),
        group_by,
        bucket,
        tz: tz.clone(),
    };
    let overflow = |_| ApiError::unprocessable("a usage sum exceeds 128 bits");
    let (mut usage, mut groups, cost_rows) = if by_tag {
        let t = crate::usage_tags::by_tags(
            &q,
            &tag_keys,
            &tag_filter,
            (&rows, &costs),
            (tagged, tagged_costs),
        )?;
        (t.rows, t.groups, t.costs)
    } else {
        let usage = aggregate(&rows, &q).map_err(overflow)?;
        let n = usage.len();
        let costs = if with_cost {
            ciyuan_store::aggregate_cost(&costs, &q)
                .map_err(overflow)?
                .into_iter()
                .map(|(r, c)| (r, None, c))
                .collect()
        } else {
            Vec::new()
        };
        (usage, vec![None; n], costs)
    };
    // Each row's cost, matched by its key; a priced entry without tokens (a
    // per-request price) still gets its row.
    let mut cost_of: Vec<Option<ciyuan_store::RowCost>> = vec![None; usage.len()];
    let mut cost_totals: Option<ciyuan_store::RowCost> = with_cost.then(Default::default);
    if with_cost {
        let key = |r: &ciyuan_store::UsageRow, g: &crate::usage_tags::Group| {
            (
                r.bucket_start,
                r.account.clone(),
                r.service.clone(),
                r.model.clone(),
                g.clone(),
            )
        };
        let mut index: BTreeMap<_, usize> = usage
            .iter()
            .zip(&groups)
            .enumerate()
            .map(|(i, (u, g))| (key(u, g), i))
            .collect();
        for (row, group, cost) in cost_rows {
            if let Some(totals) = &mut cost_totals {
                for (c, a) in &cost {
                    let slot = totals.entry(*c).or_insert(ciyuan_core::ExactSum::ZERO);
                    *slot = slot
                        .checked_add(*a)
                        .ok_or(ciyuan_store::SumOverflow)
                        .map_err(overflow)?;
                }
            }
            match index.get(&key(&row, &group)) {
                Some(&i) => cost_of[i] = Some(cost),
                None => {
                    index.insert(key(&row, &group), usage.len());
                    usage.push(row);
                    groups.push(group);
                    cost_of.push(Some(cost));
                }
            }
        }
        for c in cost_of.iter_mut() {
            c.get_or_insert_with(Default::default);
        }
    }
    let strings = |c: ciyuan_store::RowCost| {
        c.into_iter()
            .map(|(cur, a)| (cur.to_string(), a.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let rows = usage
        .into_iter()
        .zip(cost_of)
        .zip(groups)
        .map(|((r, cost), group)| {
            Ok(Row {
                tags: group.map(|values| tag_keys.iter().cloned().zip(values).collect()),
                bucket_start: r.bucket_start.map(|t| {
                    t.to_zoned(tz.clone())
                        .strftime("%Y-%m-%dT%H:%M:%S%:z")
                        .to_string()
                }),
                account: r.account.map(|a| a.to_string()),
                service: r.service,
                model: r.model,
                total: r
                    .tokens
                    .total()
                    .ok_or(ciyuan_store::SumOverflow)
                    .map_err(overflow)?,
                tokens: Sums(r.tokens),
                cost: cost.map(strings),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(axum::Json(Answer {
        account: account.to_string(),
        group_by: group_names,
        tags: tag_filter.iter().map(|(k, v)| format!("{k}:{v}")).collect(),
        bucket: bucket_name,
        tz: tz_name,
        from,
        to,
        rows,
        cost_totals: cost_totals.map(strings),
    }))
}
