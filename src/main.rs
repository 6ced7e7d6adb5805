//! Entry point: parse, run, exit with 0 (done), 1 (failed or refused) or 2 (usage error).

fn main() {
    let code = match raylimit::cli::parse(std::env::args_os()) {
        Ok(cli) => raylimit::cli::run(cli),
        Err(code) => code,
    };
    std::process::exit(code);
}
