//! `GET /v1/admin/queries?database=`: the statements that took the most time on one database, from
//! PostgreSQL's `pg_stat_statements`. `keel up` loads it in its cluster and installs it in every
//! database ([`enable`]); an external deployment adds `pg_stat_statements` to
//! `shared_preload_libraries` and runs `CREATE EXTENSION pg_stat_statements` in each database.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::db::{database_label, DbError, Sql};
use crate::http::auth::Admin;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{Json, Query};
use crate::http::PageParams;
use crate::state::AppState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueriesParams {
    /// `catalog`, or a shard: `shard_0`, `shard_1`, … (as `GET /v1/admin/shards` and the metrics name them).
    pub database: String,
    /// How many statements, the most time-consuming first: 1 to 100, default 20.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueryStat {
    /// The statement as PostgreSQL normalised it (constants as `$n`).
    pub query: String,
    pub calls: i64,
    /// Time spent running it, over all its calls, since the statistics were last reset.
    pub total_ms: f64,
    pub mean_ms: f64,
    /// Rows it returned or changed, over all its calls.
    pub rows: i64,
    /// The share of the blocks it read that were in PostgreSQL's shared buffers; null when it read none.
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Queries {
    pub database: String,
    pub items: Vec<QueryStat>,
}

/// Installs `pg_stat_statements` in the database at `url`, if the server loads it: `keel up` does
/// this for each of its databases at every start. A failure is logged, never fatal: only the
/// query insight is missing then.
pub async fn enable(url: &str) {
    let outcome = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        let created = client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await;
        drop(client);
        let _ = connection.await;
        created
    }
    .await;
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "could not install pg_stat_statements: GET /v1/admin/queries will say so");
    }
}

#[utoipa::path(get, path = "/v1/admin/queries", tag = "admin", params(QueriesParams), security(("bearer" = [])),
    responses((status = 200, description = "The statements that took the most time on the database", body = Queries),
        (status = 400, description = "No `database`, or a limit that is not a number", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "pg_stat_statements is not installed in that database", body = Problem),
        (status = 422, description = "No such database, or a limit out of range", body = Problem),
        (status = 503, body = Problem)))]
pub async fn top_statements(
    State(state): State<AppState>,
    _: Admin,
    Query(params): Query<QueriesParams>,
) -> Result<Json<Queries>, ApiError> {
    let limit = PageParams::page_size(params.limit)?;
    // Named as the replicas' and shards' admin routes name them.
    let shards = state.db.shards();
    let databases: Vec<(String, &crate::db::Db)> = std::iter::once(("catalog".to_owned(), &state.db.catalog))
        .chain(shards.all().map(|(n, db)| (database_label(usize::from(n)), &**db)))
        .collect();
    let Some((name, db)) = databases.iter().find(|(name, _)| *name == params.database) else {
        let names: Vec<&str> = databases.iter().map(|(name, _)| name.as_str()).collect();
        let why = format!("no database {:?}; there are {}", params.database, names.join(", "));
        return Err(ApiError::invalid("database", &why));
    };
    let client = db.client().await?;
    let rows = client
        .rows(
            "SELECT query, calls, total_exec_time, mean_exec_time, rows, shared_blks_hit, shared_blks_read
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY total_exec_time DESC LIMIT $1",
            &[&limit],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        // The view is missing (no extension), or the server does not load the library.
        Err(e) if matches!(e.code().map(|c| c.code()), Some("42P01") | Some("55000")) => {
            return Err(ApiError::Conflict(format!(
                "pg_stat_statements is not available in the {} database: load it (shared_preload_libraries) and \
                 CREATE EXTENSION pg_stat_statements there",
                name
            )))
        }
        Err(e) => return Err(DbError::from(e).into()),
    };
    let items = rows
        .iter()
        .map(|row| {
            let (hit, read): (i64, i64) = (row.get(5), row.get(6));
            QueryStat {
                query: row.get(0),
                calls: row.get(1),
                total_ms: row.get(2),
                mean_ms: row.get(3),
                rows: row.get(4),
                hit_ratio: (hit + read > 0).then(|| hit as f64 / (hit + read) as f64),
            }
        })
        .collect();
    Ok(Json(Queries { database: name.clone(), items }))
}
