//! `raylimit reset`: a way back to a clean host. Every limit the owner annotations record (or
//! only one owner's, one device's, one namespace's) is removed the way its runtime would remove
//! it, whether or not that runtime still runs: each owner's limits on a device are one run,
//! dry-run unless `--execute`. Annotations of a namespace or device that no longer exists are
//! dropped (their kernel objects went with it).

use std::collections::BTreeSet;

use clap::Args;

use super::limit::{LimitError, RunArgs};
use super::policy_file::{render, Batch};
use super::progress::{self, Progress};
use super::report::Report;
use super::Failure;
use crate::engine::{self, prune, Engine, NetlinkKernel, OpenError};
use crate::ownership::StateDir;
use crate::policy::SubjectKey;
use crate::runtime::{procfs, Runtime};

#[derive(Args, Debug)]
pub struct ResetArgs {
    /// Only this owner's limits, as `status` shows it (`host:/usr/bin/xray config=...` or
    /// `container:NAME`), running or not.
    #[arg(long, value_name = "OWNER")]
    pub owner: Option<String>,
    /// Only the limits on this device.
    #[arg(long, value_name = "DEV")]
    pub device: Option<String>,
    /// Only this subject's limits, as `status` names it (`ip 203.0.113.10`, `ip all`,
    /// `uuid ID`, `inbound TAG`, ...).
    #[arg(long, value_name = "SUBJECT")]
    pub subject: Option<String>,
    /// Only limits in this direction.
    #[arg(long, value_parser = ["upload", "download"])]
    pub direction: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(netns: Option<&str>, a: &ResetArgs) -> i32 {
    let format = a.run.format;
    if a.run.execute && procfs::has_net_admin(std::path::Path::new("/proc")) == Some(false) {
        let e = LimitError::NotPermitted;
        return super::fail(format, e.failure(), e);
    }
    let subject = match a.subject.as_deref().map(str::parse::<SubjectKey>) {
        Some(Err(e)) => {
            let m = format!("--subject: {e} (as status names it: `ip 203.0.113.10`, `ip all`, `uuid ID`, `inbound TAG`)");
            return super::fail(format, Failure::Usage, m);
        }
        Some(Ok(k)) => Some(k),
        None => None,
    };
    let state = StateDir::from_env();
    let annotations = match state.load() {
        Ok(a) => a,
        Err(e) => return super::fail(format, Failure::Refused, format!("reset: {e}")),
    };
    // One run per (namespace, device, owner), in a stable order.
    let groups: BTreeSet<(String, String, String)> = annotations
        .iter()
        .filter(|x| netns.is_none_or(|n| x.netns == n))
        .filter(|x| a.owner.as_ref().is_none_or(|o| &x.owner == o))
        .filter(|x| a.device.as_ref().is_none_or(|d| &x.device == d))
        .filter(|x| subject.as_ref().is_none_or(|k| &x.subject == k))
        .filter(|x| a.direction.as_ref().is_none_or(|d| &x.direction == d))
        .map(|x| {
            (
                x.netns.to_string(),
                x.device.to_string(),
                x.owner.to_string(),
            )
        })
        .collect();
    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut gone = Vec::new();
    let mut progress = Progress::on_terminal("reset: devices and owners");
    for (i, (ns, device, owner)) in groups.iter().enumerate() {
        progress.update(i, groups.len());
        let ns = (!ns.is_empty()).then_some(ns.as_str());
        let opened = NetlinkKernel::open(ns)
            .map_err(OpenError::from)
            .and_then(|kernel| {
                let options = engine::Options {
                    netns: ns.map(str::to_string),
                    execute: a.run.execute,
                    allow_missing_state: a.run.allow_missing_tc_state,
                    device_scope: false,
                    state_dir: state.clone(),
                };
                Engine::open(kernel, Runtime::recorded(owner), device, options)
            });
        let mut engine = match opened {
            Ok(e) => e,
            // The namespace or the device is gone, and raylimit's objects with it.
            Err(OpenError::NoDevice { .. }) => {
                gone.push((ns.map(str::to_string), device.clone(), owner.clone()));
                continue;
            }
            Err(_) if !netns_exists(ns) => {
                gone.push((ns.map(str::to_string), device.clone(), owner.clone()));
                continue;
            }
            Err(e) => return super::fail(format, Failure::Failed, format!("reset: {e}")),
        };
        let stale = prune::stale(
            engine.annotations(),
            engine.netns_key(),
            owner,
            device,
            &BTreeSet::new(),
        );
        let mut staged = Vec::new();
        for s in stale {
            if subject.as_ref().is_some_and(|k| &s.key != k)
                || a.direction
                    .as_ref()
                    .is_some_and(|d| s.direction.name() != d)
            {
                continue;
            }
            let wanted = s.removal(device);
            let place = ns.map(|n| format!(" in {n}")).unwrap_or_default();
            let name = format!(
                "{} {} on {device}{place} (owner {owner})",
                s.key,
                s.direction.name()
            );
            staged.push((name, wanted.clone(), engine.resolve(&wanted)));
        }
        engine.on_progress(progress::for_engine(&format!(
            "reset: kernel steps on {device}"
        )));
        let mut run = engine.commit();
        for (name, wanted, s) in staged {
            reports.push((name, Report::build(&engine, &wanted, s, &mut run)));
        }
    }
    progress.clear();
    if !gone.is_empty() && a.run.execute {
        if let Err(e) = forget(&state, &gone) {
            return super::fail(format, Failure::Failed, format!("reset: {e}"));
        }
    }
    for (ns, device, owner) in &gone {
        let place = ns
            .as_deref()
            .map(|n| format!(" in {n}"))
            .unwrap_or_default();
        let verb = if a.run.execute {
            "forgotten"
        } else {
            "would be forgotten"
        };
        println!("{device}{place} no longer exists: the limits recorded there for {owner} {verb}");
    }
    if reports.is_empty() && gone.is_empty() {
        println!("Nothing to reset: raylimit records no limits here.");
        return 0;
    }
    let batch = Batch {
        operation: "reset",
        file: None,
        run: &a.run,
    };
    render(&batch, &reports, &[])
}

fn netns_exists(ns: Option<&str>) -> bool {
    ns.is_none_or(|n| std::path::Path::new("/run/netns").join(n).exists())
}

/// Drops the annotations of devices or namespaces that no longer exist, under the lock.
fn forget(state: &StateDir, gone: &[(Option<String>, String, String)]) -> Result<(), String> {
    let _lock = state.lock()?;
    let mut annotations = state.load().map_err(|e| e.to_string())?;
    let doomed: Vec<_> = annotations
        .iter()
        .filter(|x| {
            gone.iter().any(|(ns, device, owner)| {
                x.netns == ns.clone().unwrap_or_default()
                    && &x.device == device
                    && &x.owner == owner
            })
        })
        .map(|x| {
            (
                x.netns.clone(),
                x.shaped_device.clone(),
                x.subject.clone(),
                x.owner.clone(),
            )
        })
        .collect();
    for (ns, shaped, subject, owner) in doomed {
        annotations.remove(&ns, &shaped, &subject, &owner);
    }
    state.save(&annotations)
}
