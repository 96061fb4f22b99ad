//! `tally serve`: builds every role asked for, serves HTTP, and shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::Uri;
use axum::routing::{get, post};
use rdkafka::producer::{FutureProducer, Producer as _};
use tally_aggregator::Aggregator;
use tally_infra::Problem;
use tally_ingest::IngestService;
use tally_read::ReadService;
use tally_strict::StrictService;
use tally_widgets::WidgetService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::{Role, ServeArgs};
use crate::guard::{self, WriteGuard};
use crate::health::{self, Dependencies};
use crate::{http_metrics, openapi};

/// A built, not yet running, Tally process.
pub struct App {
    listener: TcpListener,
    router: Router,
    producer: Option<FutureProducer>,
    aggregator: Option<Aggregator>,
    write_guard: Arc<WriteGuard>,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
}

impl App {
    /// Connects to the stores, prepares the schema and topic, and binds the listener.
    pub async fn build(args: ServeArgs, cancel: CancellationToken) -> anyhow::Result<Self> {
        let pool = tally_infra::postgres::connect(&args.store)?;
        if args.migrate_on_start {
            tally_infra::postgres::migrate(&pool).await?;
        }
        let redis = tally_infra::redis_store::connect(&args.store)?;
        health::warn_if_redis_can_evict(redis.clone()).await;
        if args.runs(Role::Ingest) || args.runs(Role::Aggregator) {
            tally_infra::kafka::ensure_topic(&args.store).await?;
        }
        let kafka_metadata = Arc::new(tally_infra::kafka::metadata_client(&args.store)?);

        let mut router = Router::new();
        let mut producer = None;
        let mut ingest = None;
        let write_guard = Arc::new(WriteGuard::new(&args.security));
        if args.runs(Role::Ingest) {
            let kafka_producer = tally_infra::kafka::producer(&args.store, &args.pipeline)?;
            producer = Some(kafka_producer.clone());
            let service = IngestService::new(
                kafka_producer,
                redis.clone(),
                pool.clone(),
                &args.store,
                &args.pipeline,
                &args.ingest,
            );
            let service = Arc::new(service);
            ingest = Some(Arc::clone(&service));
            let writes = tally_ingest::router(service, args.ingest.body_max_bytes).route_layer(
                axum::middleware::from_fn_with_state(Arc::clone(&write_guard), guard::guard_writes),
            );
            router = router.merge(writes);
            // Strict counters are written synchronously in PostgreSQL, behind the same guard.
            let strict = Arc::new(StrictService::new(pool.clone(), &args.pipeline));
            tokio::spawn(Arc::clone(&strict).prune_expired_keys_periodically(cancel.clone()));
            let strict_writes = tally_strict::write_router(Arc::clone(&strict)).route_layer(
                axum::middleware::from_fn_with_state(Arc::clone(&write_guard), guard::guard_writes),
            );
            router = router.merge(strict_writes);
        }
        if args.runs(Role::Ingest) || args.runs(Role::Read) {
            // A strict counter is read straight from PostgreSQL, by either role.
            let strict = Arc::new(StrictService::new(pool.clone(), &args.pipeline));
            router = router.merge(tally_strict::read_router(strict));
        }
        if args.runs(Role::Read) {
            let service = Arc::new(ReadService::new(
                redis.clone(),
                pool.clone(),
                &args.store,
                &args.pipeline,
                &args.aggregator,
                &args.read,
            ));
            router = router.merge(tally_read::router(Arc::clone(&service)));
            // Widgets read through the read service, and count through the ingest when this
            // process has it, behind the write guard like any increment.
            let widgets = Arc::new(WidgetService::new(service, ingest.clone()));
            router = router.merge(tally_widgets::router(widgets).route_layer(
                axum::middleware::from_fn_with_state(
                    Arc::clone(&write_guard),
                    guard::guard_counting_widgets,
                ),
            ));
        }
        let mut aggregator = None;
        if args.runs(Role::Aggregator) {
            // A connection of its own: the aggregator copies commits into the mirror in long
            // pipelines, and on the shared multiplexed connection the ingest's deltas and the
            // reads would queue behind them.
            let mirror_redis = tally_infra::redis_store::connect(&args.store)?;
            aggregator = Some(Aggregator::build(
                &args.store,
                &args.pipeline,
                &args.aggregator,
                pool.clone(),
                mirror_redis,
                args.auto_replay,
                cancel.clone(),
            )?);
        }
        let dependencies = Arc::new(Dependencies {
            redis,
            pool,
            kafka: kafka_metadata,
        });
        let admin = admin_router(&args, ingest);
        let router = router
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz).with_state(dependencies))
            .route("/metrics", get(openapi::metrics))
            .route("/openapi.json", get(openapi::openapi_json))
            .merge(admin)
            // An empty name has no segment for the router to match; answer it as a bad name.
            .route("/v1/counters//increment", post(empty_name))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn(guard::add_bearer_challenge))
            .layer(axum::middleware::from_fn_with_state(
                args.security.header_max_bytes,
                guard::cap_header_size,
            ))
            .layer(axum::middleware::from_fn(http_metrics::track));

        let listener = TcpListener::bind(args.http.http_addr)
            .await
            .with_context(|| format!("failed to listen on {}", args.http.http_addr))?;
        Ok(Self {
            listener,
            router,
            producer,
            aggregator,
            write_guard,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
            cancel,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener should have an address")
    }

    /// Serves until the cancellation token fires, then stops taking requests, answers those in
    /// flight, flushes the producer and lets the aggregator commit its window.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        info!(http.addr = %self.local_addr(), "tally serving");
        let mut tasks = JoinSet::new();
        if let Some(aggregator) = self.aggregator {
            tasks.spawn(aggregator.run());
        }
        tasks.spawn(forget_idle_clients(
            Arc::clone(&self.write_guard),
            self.cancel.clone(),
        ));
        let cancel = self.cancel.clone();
        // Connection info gives the rate limiter each client's address.
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let server = axum::serve(self.listener, service)
            .with_graceful_shutdown(async move { cancel.cancelled().await });
        tasks.spawn(async move { server.await.context("the http server failed") });

        // Run until shutdown is asked for or a task fails; a failed role takes the process down
        // rather than leaving it half alive.
        let mut first_error = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { break };
                    if let Err(error) = joined.map_err(anyhow::Error::from).and_then(|outcome| outcome) {
                        error!(error = format!("{error:#}"), "a tally task failed; shutting down");
                        first_error = Some(error);
                        self.cancel.cancel();
                        break;
                    }
                }
            }
        }
        // Shutdown has begun: give the rest the patience timer, then abort them.
        let patience = tokio::time::timeout(self.shutdown_timeout, async {
            while let Some(joined) = tasks.join_next().await {
                if let Ok(Err(error)) | Err(error) = joined.map_err(anyhow::Error::from) {
                    warn!(
                        error = format!("{error:#}"),
                        "a tally task failed while stopping"
                    );
                }
            }
        })
        .await;
        if patience.is_err() {
            warn!(timeout = ?self.shutdown_timeout, "shutdown took too long; aborting the rest");
            tasks.abort_all();
        }
        if let Some(producer) = self.producer {
            let timeout = self.shutdown_timeout;
            let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
            if let Ok(Err(error)) = flushed {
                warn!(%error, "the kafka producer did not flush every record");
            }
        }
        info!("tally stopped");
        first_error.map_or(Ok(()), Err)
    }
}

async fn forget_idle_clients(
    write_guard: Arc<WriteGuard>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(guard::LIMITER_CLEANUP_INTERVAL) => write_guard.forget_idle_clients(),
        }
    }
}

/// The admin routes, behind the admin token: the process's status, and where the ingest role
/// runs, the audited set, reset and import of plain counters and their audit trail.
fn admin_router(args: &ServeArgs, ingest: Option<Arc<IngestService>>) -> Router {
    let status = Arc::new(ProcessStatus {
        roles: args.roles.clone(),
        kafka_topic: args.store.kafka_topic.clone(),
        aggregator_group: args.aggregator.aggregator_group.clone(),
        window_ms: args.pipeline.window_ms,
        produce_timeout_ms: args.pipeline.produce_timeout_ms,
        version: env!("CARGO_PKG_VERSION"),
    });
    let admin_token: Option<Arc<str>> = args.security.admin_token.as_deref().map(Arc::from);
    let mut router = Router::new().route("/v1/admin/status", get(admin_status).with_state(status));
    if let Some(ingest) = ingest {
        router = router.merge(tally_ingest::admin_router(ingest));
    }
    router.route_layer(axum::middleware::from_fn_with_state(
        admin_token,
        guard::guard_admin,
    ))
}

/// What `GET /v1/admin/status` says about this process.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProcessStatus {
    /// The roles this process runs: `ingest`, `read`, `aggregator`.
    #[schema(value_type = Vec<String>)]
    roles: Vec<Role>,
    kafka_topic: String,
    aggregator_group: String,
    window_ms: u64,
    produce_timeout_ms: u64,
    version: &'static str,
}

/// The roles and pipeline settings of this process.
#[utoipa::path(
    get,
    path = "/v1/admin/status",
    responses(
        (status = 200, description = "This process's roles and settings", body = ProcessStatus),
        (status = 401, description = "Missing or wrong admin token", content_type = "application/problem+json"),
        (status = 403, description = "Admin routes are disabled", content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "admin"
)]
pub async fn admin_status(
    axum::extract::State(status): axum::extract::State<Arc<ProcessStatus>>,
) -> axum::Json<Arc<ProcessStatus>> {
    axum::Json(status)
}

async fn empty_name() -> Problem {
    tally_infra::counter_path::invalid_counter_name(&tally_core::CounterNameError::Empty)
}

async fn not_found(uri: Uri) -> Problem {
    if uri.path() == "/v1/counters/" {
        return tally_infra::counter_path::invalid_counter_name(
            &tally_core::CounterNameError::Empty,
        );
    }
    Problem::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(uri: Uri) -> Problem {
    Problem::method_not_allowed(format!("{} does not take this method", uri.path()))
}
