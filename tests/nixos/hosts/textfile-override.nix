# The policy names its own textfile: node_exporter's collector and the directory follow it.
# Its ping URL is in the store, which a warning says.
{
  services.prometheus.exporters.node.enable = true;
  services.snapsync = {
    enable = true;
    startAt = [ "*:00" "*:30" ];
    policy = {
      groups.home = { backend = "btrfs"; datasets = [ "/persist/home" ]; retention.daily = 7; };
      monitoring.textfile = "/var/lib/prometheus-node-exporter-text/snapsync.prom";
      monitoring.ping_url = "https://hc-ping.com/not-so-secret";  # warned about: it lands in the store
    };
  };
}
