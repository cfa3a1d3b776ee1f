//! `sequel`: the command line over the built-in algorithms and strategies.

fn main() -> std::process::ExitCode {
    sequel_cli::main_with(sequel_algos::Registry::builtin())
}
