//! What every server of the test bed shares around its process: the binary, the
//! temporary directory, the name that tells it from a stranger on its ports, the
//! ports themselves, and the lifecycle (start on fresh ports, restart on the same
//! ports and data, SIGKILL, SIGTERM, SIGSTOP, SIGCONT) under the crate's bounds.
//! [`crate::Nats`] and [`crate::ClickHouse`] add only how to launch and probe one run.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{
    free_ports, retry_on_port_taken, unique_name, BinarySpec, ServerProcess, StartFailure,
};
use crate::{TestbedError, SIGNAL_SETTLE_TIMEOUT_MS, START_ATTEMPTS_MAX, TERMINATE_TIMEOUT_MS};

/// What differs between the servers before their first launch.
pub(crate) struct ServerSpec {
    /// Where to find the executable; its name also names the server in errors.
    pub(crate) binary: BinarySpec,
    /// How messages call the server ("NATS").
    pub(crate) label: &'static str,
    /// Prefix of the temporary directory's name.
    pub(crate) dir_prefix: &'static str,
    /// Prefix of the unique name the readiness probe looks for.
    pub(crate) name_prefix: &'static str,
}

/// Where one run of a server is launched: its binary, directory, unique name and ports.
#[derive(Clone, Copy)]
pub(crate) struct Launch<'a, const N: usize> {
    pub(crate) binary: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) name: &'a str,
    pub(crate) ports: [u16; N],
}

/// A running (or killed, awaiting restart) server with `N` ports.
#[derive(Debug)]
pub(crate) struct Server<const N: usize> {
    // Declared first so the server dies before its directory is removed.
    process: ServerProcess,
    server: &'static str,
    binary: PathBuf,
    name: String,
    ports: [u16; N],
    dir: TempDir,
}

impl<const N: usize> Server<N> {
    /// Creates the directory and launches on free ports, on fresh ones again while a
    /// port turns out taken, up to [`START_ATTEMPTS_MAX`] times. `launch` must return
    /// only once the run is ready.
    pub(crate) fn start(
        spec: &ServerSpec,
        launch: impl FnMut(&Launch<N>) -> Result<ServerProcess, StartFailure>,
    ) -> Result<Self, TestbedError> {
        let binary = spec.binary.locate()?;
        Self::start_binary(spec, binary, launch)
    }

    /// [`Server::start`] with the executable already found.
    pub(crate) fn start_binary(
        spec: &ServerSpec,
        binary: PathBuf,
        mut launch: impl FnMut(&Launch<N>) -> Result<ServerProcess, StartFailure>,
    ) -> Result<Self, TestbedError> {
        let dir = tempfile::Builder::new()
            .prefix(spec.dir_prefix)
            .tempdir()
            .map_err(|e| TestbedError::io(format!("creating the {} directory", spec.label), e))?;
        let name = unique_name(spec.name_prefix);
        let (process, ports) = retry_on_port_taken(spec.binary.name, START_ATTEMPTS_MAX, || {
            let ports = free_ports::<N>()?;
            let process = launch(&Launch {
                binary: &binary,
                dir: dir.path(),
                name: &name,
                ports,
            })?;
            Ok((process, ports))
        })?;
        Ok(Server {
            process,
            server: spec.binary.name,
            binary,
            name,
            ports,
            dir,
        })
    }

    /// Launches again on the same ports and directory; a running server is killed
    /// with SIGKILL first.
    pub(crate) fn restart(
        &mut self,
        mut launch: impl FnMut(&Launch<N>) -> Result<ServerProcess, StartFailure>,
    ) -> Result<(), TestbedError> {
        self.process.kill9()?;
        let process = retry_on_port_taken(self.server, START_ATTEMPTS_MAX, || {
            launch(&Launch {
                binary: &self.binary,
                dir: self.dir.path(),
                name: &self.name,
                ports: self.ports,
            })
        })?;
        self.process = process;
        Ok(())
    }

    pub(crate) fn ports(&self) -> [u16; N] {
        self.ports
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub(crate) fn kill9(&mut self) -> Result<(), TestbedError> {
        self.process.kill9()
    }

    pub(crate) fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.process
            .terminate(Duration::from_millis(TERMINATE_TIMEOUT_MS))
    }

    pub(crate) fn pause(&self) -> Result<(), TestbedError> {
        self.process
            .pause(Duration::from_millis(SIGNAL_SETTLE_TIMEOUT_MS))
    }

    pub(crate) fn resume(&self) -> Result<(), TestbedError> {
        self.process
            .resume(Duration::from_millis(SIGNAL_SETTLE_TIMEOUT_MS))
    }
}
