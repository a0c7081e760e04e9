//! `sparegrid-controller`: placeholder binary until the controller issue lands.
//! It exists so the workspace layout matches the design card.

fn main() {
    eprintln!(
        "sparegrid-controller {}: not built yet (see issue 3)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
