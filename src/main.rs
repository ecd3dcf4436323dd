use std::process::ExitCode;

fn main() -> ExitCode {
    costwatch::cli::main()
}
