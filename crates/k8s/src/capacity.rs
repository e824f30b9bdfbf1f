//! Whether a run fits the cluster before any pod is created: a run that cannot fit would
//! otherwise leave pods pending until its timeout.

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::quantity;

/// The label of nodes meant for plan pods (the original's). When some node has it, only
/// those nodes count and pods are pinned to them.
pub const PLAN_NODE_LABEL: &str = "testground.node.role.plan";

/// What one schedulable node has left for new pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoom {
    pub name: String,
    pub cpu_m: u64,
    pub memory: u64,
    pub pods: u64,
}

/// Ready, schedulable nodes (those labelled [`PLAN_NODE_LABEL`]`=true` if any is) and what
/// the pods already bound to them leave free of their allocatable resources.
pub fn rooms(nodes: &[Node], pods: &[Pod]) -> (Vec<NodeRoom>, bool) {
    let labelled = nodes.iter().any(is_plan_node);
    let mut out = Vec::new();
    for n in nodes {
        if labelled && !is_plan_node(n) {
            continue;
        }
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let unschedulable = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if !ready || unschedulable {
            continue;
        }
        let name = n.metadata.name.clone().unwrap_or_default();
        let alloc = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let get = |k: &str, parse: fn(&str) -> Option<u64>| {
            alloc
                .and_then(|a| a.get(k))
                .and_then(|q| parse(&q.0))
                .unwrap_or(0)
        };
        let (mut cpu_m, mut memory, mut slots) = (
            get("cpu", quantity::cpu_millis),
            get("memory", quantity::bytes),
            get("pods", |s| s.parse().ok()),
        );
        for p in pods {
            let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&name);
            let done = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if !on_node || done {
                continue;
            }
            slots = slots.saturating_sub(1);
            for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
                let req = c.resources.as_ref().and_then(|r| r.requests.as_ref());
                let r = |k: &str, parse: fn(&str) -> Option<u64>| {
                    req.and_then(|m| m.get(k))
                        .and_then(|q| parse(&q.0))
                        .unwrap_or(0)
                };
                cpu_m = cpu_m.saturating_sub(r("cpu", quantity::cpu_millis));
                memory = memory.saturating_sub(r("memory", quantity::bytes));
            }
        }
        out.push(NodeRoom {
            name,
            cpu_m,
            memory,
            pods: slots,
        });
    }
    (out, labelled)
}

fn is_plan_node(n: &Node) -> bool {
    n.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PLAN_NODE_LABEL))
        .is_some_and(|v| v == "true")
}

/// Whether `count` pods of `cpu_m` millicores and `memory` bytes each fit in `rooms`, placed
/// greedily node by node (a pod cannot straddle nodes). The error starts with the
/// original's words.
pub fn check(rooms: &[NodeRoom], count: u64, cpu_m: u64, memory: u64) -> Result<(), String> {
    let mut placed = 0u64;
    for r in rooms {
        let by_cpu = r.cpu_m.checked_div(cpu_m).unwrap_or(u64::MAX);
        let by_mem = r.memory.checked_div(memory).unwrap_or(u64::MAX);
        placed = placed.saturating_add(by_cpu.min(by_mem).min(r.pods));
    }
    if placed >= count {
        return Ok(());
    }
    let (cpu, mem, pods) = rooms.iter().fold((0, 0, 0), |(c, m, p), r| {
        (c + r.cpu_m, m + r.memory, p + r.pods)
    });
    Err(format!(
        "too many test instances requested, resize cluster if you need more capacity: \
         {count} pods of {} CPU and {} each need {} CPU and {}; the {} schedulable node(s) \
         have {} CPU, {} and {pods} pod slots free, room for {placed}",
        quantity::human_cpu(cpu_m),
        quantity::human_bytes(memory),
        quantity::human_cpu(cpu_m.saturating_mul(count)),
        quantity::human_bytes(memory.saturating_mul(count)),
        rooms.len(),
        quantity::human_cpu(cpu),
        quantity::human_bytes(mem),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, mem: &str, pods: &str, ready: bool, plan: bool) -> Node {
        let labels = if plan {
            json!({PLAN_NODE_LABEL: "true"})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": pods},
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn running_pods_use_room_and_finished_ones_do_not() {
        let nodes = [node("n1", "2", "4Gi", "110", true, false)];
        let pods: Vec<Pod> = serde_json::from_value(json!([
            {"spec": {"nodeName": "n1", "containers": [{"name": "a",
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]},
             "status": {"phase": "Running"}},
            {"spec": {"nodeName": "n1", "containers": [{"name": "b",
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]},
             "status": {"phase": "Succeeded"}}
        ]))
        .unwrap();
        let (rooms, labelled) = rooms(&nodes, &pods);
        assert!(!labelled);
        assert_eq!(
            rooms,
            vec![NodeRoom {
                name: "n1".into(),
                cpu_m: 1500,
                memory: 3 << 30,
                pods: 109
            }]
        );
        assert!(check(&rooms, 15, 100, 1 << 20).is_ok());
        let e = check(&rooms, 16, 100, 1 << 20).unwrap_err();
        assert!(
            e.starts_with("too many test instances requested, resize cluster"),
            "{e}"
        );
        assert!(e.contains("room for 15"), "{e}");
        // Pod slots bind too.
        assert!(check(&rooms, 110, 1, 1).is_err());
    }

    #[test]
    fn only_ready_plan_nodes_count_and_pods_do_not_straddle() {
        let nodes = [
            node("a", "1", "1Gi", "110", true, true),
            node("b", "1", "1Gi", "110", true, true),
            node("c", "64", "64Gi", "110", true, false),
            node("d", "64", "64Gi", "110", false, true),
        ];
        let (rooms, labelled) = rooms(&nodes, &[]);
        assert!(labelled);
        assert_eq!(
            rooms.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // 2 CPUs in total but 0.6 per pod: one per node.
        assert!(check(&rooms, 2, 600, 1).is_ok());
        assert!(check(&rooms, 3, 600, 1).is_err());
    }
}
