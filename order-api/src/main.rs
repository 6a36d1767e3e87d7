//! `faultline-order-api`: the order API of the lab's demo stack (nginx -> order API ->
//! PostgreSQL + Redis), the small but real service that Faultline's game-days break, and its
//! built-in load generator.
//!
//! - `serve`: the HTTP API (`/health`, `/orders`, `/orders/{id}`, `/metrics`, and the same
//!   under `/api/`). It starts without its backends and rides out their restarts and
//!   partitions: every PostgreSQL operation is bounded at 2 s, every Redis one at 300 ms.
//! - `load`: an open-loop "market simulator" placing and listing orders at a fixed rate, with
//!   its own `/metrics` and a summary line on stdout every 10 s.
//!
//! Plain HTTP and plain PostgreSQL/Redis protocols only, so the binary runs in a FROM-scratch
//! image with just the shared libraries it links.

mod cache;
mod db;
mod load;
mod metrics;
mod order;
mod server;
mod shutdown;

use std::io::IsTerminal as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "faultline-order-api", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the order API.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "ORDER_API_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// PostgreSQL URL (no TLS).
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://orders@postgres:5432/orders",
            hide_env_values = true
        )]
        database_url: String,
        /// Redis URL (no TLS).
        #[arg(long, env = "REDIS_URL", default_value = "redis://redis:6379")]
        redis_url: String,
    },
    /// Generate load: 1 order placed for 3 lists, open loop, until SIGTERM.
    Load {
        /// URL orders are POSTed to and listed from.
        #[arg(long, env = "LOAD_TARGET", default_value = "http://nginx/api/orders")]
        target: String,
        /// Requests per second.
        #[arg(long, env = "LOAD_RATE", default_value_t = 10.0)]
        rate: f64,
        /// Address of the generator's own /metrics.
        #[arg(long, env = "LOAD_METRICS_LISTEN", default_value = "0.0.0.0:9100")]
        metrics_listen: SocketAddr,
        /// Most requests in flight; more are dropped (default: one second's worth, >= 8).
        #[arg(long, env = "LOAD_MAX_IN_FLIGHT")]
        max_in_flight: Option<usize>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: container logs are read as plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve {
            listen,
            database_url,
            redis_url,
        } => server::serve(listen, &database_url, &redis_url)
            .await
            .context("order API"),
        Command::Load {
            target,
            rate,
            metrics_listen,
            max_in_flight,
        } => load::run(load::LoadConfig {
            target,
            rate,
            metrics_listen,
            max_in_flight,
        })
        .await
        .context("load generator"),
    }
}
