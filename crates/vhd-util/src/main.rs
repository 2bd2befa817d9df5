//! `vhd-util`: the VHD maintenance tool of blktap, with the same commands,
//! options, output lines and exit statuses (exit status = errno; usage
//! errors exit with EINVAL, 22). Messages go to stdout like the C tool's.

use std::process::ExitCode;

fn main() -> ExitCode {
    vhd_util::sigpipe::terminate_on_broken_pipe();
    let settings = vhd_util::Settings::for_this_build(|name| std::env::var(name).ok());
    let args = std::env::args().skip(1).collect();
    vhd_util::exit_code(vhd_util::vhd_util(&settings, args))
}
