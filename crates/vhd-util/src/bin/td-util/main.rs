//! `td-util`: the tapdisk utility of blktap (create, snapshot, query and
//! set VDIs), the C tool's commands, output and exit statuses; it runs the
//! same code as `vhd-util`.

use std::process::ExitCode;

fn main() -> ExitCode {
    vhd_util::sigpipe::terminate_on_broken_pipe();
    let settings = vhd_util::Settings::for_this_build(|name| std::env::var(name).ok());
    let args: Vec<String> = std::env::args().skip(1).collect();
    vhd_util::exit_code(vhd_util::td::td_util(&settings, &args))
}
