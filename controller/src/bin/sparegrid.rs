//! `sparegrid`: the command-line client of the controller's job API. All
//! logic lives in [`sparegrid_controller::cli`]; this only wires the process's
//! arguments, stdout and stderr to it and exits with its code.

fn main() {
    // stderr stays unlocked: the progress bar draws on it from its own thread.
    let code = sparegrid_controller::cli::run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
