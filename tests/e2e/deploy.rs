//! The deployment files, checked by real tools: the Kubernetes manifests against Kubernetes'
//! own schema (kubernetes-validate, from PyPI, strict) and the pool's rules the schema cannot
//! know (`scripts/check_kubernetes.py`).

use std::path::Path;
use std::process::Command;

fn check_kubernetes(dir: &Path) -> (bool, String) {
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_kubernetes.py"))
        .arg(dir)
        .output()
        .expect("python3 scripts/check_kubernetes.py");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn the_kubernetes_manifests_pass_kubernetes_schema_and_the_pools_rules() {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes");
    let (ok, said) = check_kubernetes(&manifests);
    assert!(ok, "{said}");

    // The check can fail: a grace period the drain does not fit in, liveness on DuckDB, and a
    // field Kubernetes does not know.
    let broken = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(manifests.join("ferrocorn.yaml")).expect("manifest");
    let text = text
        .replace(
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 30",
        )
        .replace("path: /healthz", "path: /readyz")
        .replace(
            "maxUnavailable: 1",
            "maxUnavailable: 1\n  maxUnavailible: 1",
        );
    std::fs::write(broken.path().join("ferrocorn.yaml"), text).expect("write");
    let (ok, said) = check_kubernetes(broken.path());
    assert!(!ok, "{said}");
    for problem in [
        "terminationGracePeriodSeconds 30 must exceed",
        "liveness must ask /healthz",
        "maxUnavailible",
    ] {
        assert!(said.contains(problem), "{problem:?} in {said}");
    }
}
