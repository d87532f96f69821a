# The policy is a secret of the host (sops-nix, agenix): never read at build time, never in the store.
# Metrics go to node_exporter's own directory, which the policy file must name too (a warning says so).
{
  services.prometheus.exporters.node.enable = true;
  services.snapsync = {
    enable = true;
    policyFile = "/run/secrets/snapsync-policy.toml";
    prometheus.textfileDir = "/var/lib/prometheus-node-exporter";
    check.enable = true;
  };
}
