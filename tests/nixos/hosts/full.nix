# A host that does everything: sends a group with hooks to a backup host over ssh and offsite to S3,
# pulls another host's data, drills, checks, exports metrics, and receives other hosts' copies on ZFS.
{ pkgs, ... }:
{
  boot.supportedFilesystems = [ "btrfs" "zfs" ];
  services.postgresql.enable = true;
  services.prometheus.exporters.node.enable = true;
  environment.persistence."/persist/system".directories = [ "/var/lib/snapsync" ];

  services.snapsync = {
    enable = true;
    logFormat = "json";
    extraArgs = [ "--lock-timeout" "300" ];
    drill.enable = true;
    check = {
      enable = true;
      startAt = [ "*:0/15" "*:07" ];
      environmentFile = "/run/secrets/snapsync-check.env";
    };
    policy = {
      host = "forge";
      defaults = {
        timezone = "Europe/Berlin";
        retention = { keep_last = 3; hourly = 48; daily = 30; weekly = 8; monthly = 12; };
      };
      groups.forge = {
        backend = "btrfs";
        datasets = [ "/persist/system/var/lib/forgejo" "/persist/system/var/lib/postgresql" ];
        interval = "1h";
        hooks = [
          { type = "postgres"; user = "postgres"; mode = "backup"; timeout = "2m"; }
          { type = "freeze"; unit = "forgejo.service"; max_pause = "10s"; }
          { type = "command"; pre = [ "/run/current-system/sw/bin/systemctl" "stop" "outline.service" ];
            post = [ "/run/current-system/sw/bin/systemctl" "start" "outline.service" ]; on_failure = "continue"; }
        ];
        targets = [ "nas" "b2" ];
      };
      groups.media = {
        backend = "zfs";
        datasets = [ "tank/media" ];
        interval = "1d";
        retention = { daily = 7; weekly = 4; };
        targets = [ "nas" ];
      };
      targets.nas = {
        type = "ssh";
        host = "nas.home.arpa";
        user = "snapsync-receive";
        path = "tank/backup/forge";
        identity_file = "/persist/system/root/.ssh/id_ed25519";
        retention = { daily = 60; monthly = 24; };
        compress = "zstd";
      };
      targets.b2 = {
        type = "s3";
        endpoint_url = "https://s3.eu-central-003.backblazeb2.com";
        bucket = "forge-backup";
        credentials_file = "/run/secrets/b2-credentials";
        key_file = "/persist/system/var/lib/snapsync/offsite.key";
        full_every = "365d";
        chains = "levelled";
        retention = { weekly = 12; monthly = 24; };
      };
      pulls.pocket = {
        host = "pocket.home.arpa";
        path = "/persist/system/var/lib";
        datasets = [ "/persist/system/var/lib/pocket-id" ];
        into = "/persist/backup/pocket";
        retention = { daily = 14; };
      };
    };

    receive = {
      enable = true;
      backend = "zfs";
      root = "tank/backup";
      allowRestore = true;
      authorizedKeys = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN3VcEebbuXt7foJnVp0T6Dh0P2PwiZzlDgJ58oxKALQ root@forge"
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILJq3Z39YbOwhQkTB+GmtbmxIaVd+bT9CUO37MlfW4FW root@laptop"
      ];
    };
  };
}
