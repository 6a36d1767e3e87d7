//! A run's targets, as telemetry needs them: the process whose cgroups (and network
//! namespace) to watch, or a cgroup path, and the name reports use for the target.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use faultline_domain::fault::TargetSelector;

use crate::runtime::ContainerRuntime;

/// A target resolved for telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// The selector as the plan wrote it, e.g. `container db`.
    pub selector: String,
    /// How reports name it: the container name, the cgroup path, or `comm (pid N)`.
    pub name: String,
    /// The process whose cgroups and network namespace are the target's: a container's main
    /// process, or the process itself. `None` for cgroup targets.
    pub pid: Option<u32>,
    /// The cgroup path (below each hierarchy's root) of a cgroup target.
    pub cgroup: Option<String>,
}

/// A future resolving one target.
pub type Resolving<'a> = Pin<Box<dyn Future<Output = Result<ResolvedTarget, String>> + Send + 'a>>;

/// Resolves targets (object-safe, so the telemetry handle needs no runtime type parameter).
pub trait Resolve: Send + Sync {
    /// Resolves `target` now; the error says why it cannot be watched (yet).
    fn resolve(&self, target: TargetSelector) -> Resolving<'_>;
}

/// Resolves containers through the container runtime, processes and cgroups on the host.
#[derive(Debug)]
pub struct RuntimeResolver<R>(pub Arc<R>);

impl<R: ContainerRuntime> Resolve for RuntimeResolver<R> {
    fn resolve(&self, target: TargetSelector) -> Resolving<'_> {
        Box::pin(async move {
            let selector = target.to_string();
            match &target {
                t if t.is_container() => {
                    let container = self.0.resolve(t).await.map_err(|e| e.to_string())?;
                    let pid = self
                        .0
                        .main_pid(&container.id)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(ResolvedTarget {
                        selector,
                        name: container.name,
                        pid: Some(pid),
                        cgroup: None,
                    })
                }
                TargetSelector::Cgroup(path) => Ok(ResolvedTarget {
                    selector,
                    name: path.clone(),
                    pid: None,
                    cgroup: Some(path.clone()),
                }),
                _ => {
                    let process =
                        crate::process::resolve_host(&target).map_err(|e| e.to_string())?;
                    Ok(ResolvedTarget {
                        selector,
                        name: format!("{} (pid {})", process.comm, process.pid),
                        pid: Some(process.pid),
                        cgroup: None,
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ContainerState;
    use crate::runtime::fake::FakeRuntime;

    #[tokio::test]
    async fn containers_resolve_to_their_main_process_and_name() {
        let runtime =
            Arc::new(FakeRuntime::new().with_container("db", &[], ContainerState::Running));
        let pid = runtime.main_pid_of("db").unwrap();
        let resolver = RuntimeResolver(Arc::clone(&runtime));
        let db = resolver
            .resolve(TargetSelector::Container("db".into()))
            .await
            .unwrap();
        assert_eq!(
            db,
            ResolvedTarget {
                selector: "container db".into(),
                name: "db".into(),
                pid: Some(pid),
                cgroup: None,
            }
        );
        let cgroup = resolver
            .resolve(TargetSelector::Cgroup("system.slice/x.service".into()))
            .await
            .unwrap();
        assert_eq!(cgroup.cgroup.as_deref(), Some("system.slice/x.service"));
        assert_eq!(cgroup.pid, None);

        runtime.set_state("db", ContainerState::Stopped);
        let err = resolver
            .resolve(TargetSelector::Container("db".into()))
            .await
            .unwrap_err();
        assert!(err.contains("not running"), "{err}");
        let err = resolver
            .resolve(TargetSelector::Container("nope".into()))
            .await
            .unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }
}
