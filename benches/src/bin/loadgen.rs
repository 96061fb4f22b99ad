//! `loadgen`: see `loadgen --help` and benches/README.md.

use std::process::ExitCode;

use clap::Parser as _;
use tally_benches::cli::LoadgenArgs;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tally_benches::run_loadgen(LoadgenArgs::parse()).await
}
