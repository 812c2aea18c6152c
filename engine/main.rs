use clap::Parser;
use std::io::Write;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = reel::cli::Cli::parse();
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal (and not under NO_COLOR): a log piped to a file, a
        // journal or a report keeps no escape codes.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        // A log line that cannot be written (stderr on a full disk, a closed pipe) is lost,
        // not reported with eprintln!, which panics on that same stderr and would end a
        // server that is otherwise working.
        .log_internal_errors(false)
        .init();
    match reel::cli::run(cli) {
        Ok(stdout) => {
            let mut out = std::io::stdout().lock();
            match out.write_all(stdout.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "error: writing stdout: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
