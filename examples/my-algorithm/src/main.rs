//! The whole `sequel` command line, with `l2-anchor` registered beside the built-ins:
//! `cargo run --release -p my-algorithm -- run my.yaml`, `... -- sweep ...`, `--resume`, etc.

fn main() -> std::process::ExitCode {
    sequel_cli::main_with(my_algorithm::registry())
}
