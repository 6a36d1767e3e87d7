//! `faultline preflight`: what each agent's host can do, and which faults are available by
//! which mechanism — as the agents probed it, not as assumed.

use faultline_domain::preflight::FAULT_CAPABILITY_PREFIX;
use faultline_proto::v1 as pb;
use serde_json::json;

/// Renders agents' probes and fault availability as text.
pub fn render_text(agents: &[pb::AgentInfo]) -> String {
    let mut out = String::new();
    for agent in agents {
        let host = agent.host.clone().unwrap_or_default();
        let state = if agent.connected {
            "connected"
        } else {
            "not connected"
        };
        out.push_str(&format!(
            "{} ({state}; kernel {}; {}; {} cpu(s); {})\n",
            agent.name,
            or_dash(&host.kernel),
            or_dash(&host.os),
            host.cpus,
            if host.root { "root" } else { "NOT root" }
        ));
        if !agent.connected {
            out.push_str("  (capabilities are reported when the agent connects)\n\n");
            continue;
        }
        let (faults, probes): (Vec<_>, Vec<_>) = agent
            .capabilities
            .iter()
            .partition(|c| c.name.starts_with(FAULT_CAPABILITY_PREFIX));
        out.push_str("  host probes:\n");
        for probe in probes {
            out.push_str(&format!(
                "    {:<14} {:<3}  {}{}\n",
                probe.name,
                yes_no(probe.available),
                probe.mechanism,
                if probe.detail.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", probe.detail)
                }
            ));
        }
        out.push_str("  faults:\n");
        for fault in faults {
            let name = fault.name.trim_start_matches(FAULT_CAPABILITY_PREFIX);
            let how = if fault.available {
                &fault.mechanism
            } else {
                &fault.detail
            };
            out.push_str(&format!(
                "    {:<19} {:<3}  {how}\n",
                name,
                yes_no(fault.available)
            ));
        }
        out.push('\n');
    }
    out
}

/// The same as JSON.
pub fn render_json(agents: &[pb::AgentInfo]) -> serde_json::Value {
    agents
        .iter()
        .map(|agent| {
            let host = agent.host.clone().unwrap_or_default();
            let (faults, probes): (Vec<_>, Vec<_>) = agent
                .capabilities
                .iter()
                .partition(|c| c.name.starts_with(FAULT_CAPABILITY_PREFIX));
            json!({
                "agent": agent.name,
                "connected": agent.connected,
                "host": {"kernel": host.kernel, "os": host.os, "cpus": host.cpus, "root": host.root},
                "probes": probes.iter().map(|c| json!({
                    "name": c.name, "available": c.available, "mechanism": c.mechanism,
                    "detail": c.detail,
                })).collect::<Vec<_>>(),
                "faults": faults.iter().map(|c| json!({
                    "fault": c.name.trim_start_matches(FAULT_CAPABILITY_PREFIX),
                    "available": c.available, "mechanism": c.mechanism, "detail": c.detail,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn yes_no(available: bool) -> &'static str {
    if available { "yes" } else { "no" }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(name: &str, available: bool, mechanism: &str, detail: &str) -> pb::Capability {
        pb::Capability {
            name: name.into(),
            available,
            mechanism: mechanism.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn faults_show_their_mechanism_or_why_not() {
        let agent = pb::AgentInfo {
            name: "agent-2".into(),
            connected: true,
            host: Some(pb::HostFacts {
                kernel: "6.18".into(),
                cpus: 2,
                root: true,
                ..Default::default()
            }),
            capabilities: vec![
                cap("tc", true, "tc", "netem: no"),
                cap("fault:latency", true, "nfqueue delay (no netem)", ""),
                cap("fault:duplicate", false, "", "needs netem"),
            ],
            ..Default::default()
        };
        let text = render_text(std::slice::from_ref(&agent));
        assert!(text.contains("agent-2 (connected; kernel 6.18"), "{text}");
        assert!(
            text.contains("    tc             yes  tc — netem: no"),
            "{text}"
        );
        assert!(
            text.contains("    latency             yes  nfqueue delay (no netem)"),
            "{text}"
        );
        assert!(
            text.contains("    duplicate           no   needs netem"),
            "{text}"
        );
        let json = render_json(&[agent]);
        assert_eq!(json[0]["faults"][1]["fault"], "duplicate");
        assert_eq!(json[0]["faults"][1]["available"], false);
    }
}
