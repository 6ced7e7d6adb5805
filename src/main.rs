//! Entry point: parse, run, exit with 0 (done), 1 (failed or refused) or 2 (usage error).

use clap::Parser;

fn main() {
    let cli = raylimit::cli::Cli::parse();
    std::process::exit(raylimit::cli::run(cli));
}
