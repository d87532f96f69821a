# NixOS module for snapsync: the policy as Nix attributes, the timers, the receiving role, metrics.
#
#   imports = [ /path/to/snapsync/deploy/nixos/module.nix ];
#   services.snapsync = {
#     enable = true;
#     policy = {
#       version = 1;
#       groups.persist = { backend = "btrfs"; datasets = [ "/persist" ]; targets = [ "nas" ]; };
#       targets.nas = { type = "ssh"; host = "nas.home.arpa"; user = "snapsync-receive"; path = "tank/backup/laptop"; };
#     };
#   };
#
# and on the NAS:
#
#   services.snapsync.receive = {
#     enable = true;
#     backend = "zfs";
#     root = "tank/backup";
#     authorizedKeys = [ "ssh-ed25519 AAAA... root@laptop" ];
#   };
#
# docs/monitoring.md explains every option; docs/policy.md the policy's keys.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption optional optionalAttrs optionalString types;

  cfg = config.services.snapsync;
  toml = pkgs.formats.toml { };

  # The module writes the textfile where node_exporter looks, unless the policy says otherwise.
  monitoring = { textfile = "${cfg.prometheus.textfileDir}/snapsync.prom"; } // (cfg.policy.monitoring or { });
  policyFile =
    if cfg.policyFile != null then cfg.policyFile
    else toml.generate "snapsync-policy.toml" (cfg.policy // { inherit monitoring; });

  snapsync = "${cfg.package}/bin/snapsync";
  global = "--policy /etc/snapsync/policy.toml --log-format ${cfg.logFormat}";
  zfsEnabled = config.boot.zfs.enabled or false;
  zfsPackage = config.boot.zfs.package or pkgs.zfs;
  # ssh and zstd carry streams; btrfs-progs and zfs snapshot and receive; systemctl for freeze and command hooks.
  # The drill starts PostgreSQL on a restored copy: with the host's own server binaries.
  tools = [ pkgs.openssh pkgs.zstd pkgs.btrfs-progs pkgs.util-linux pkgs.coreutils config.systemd.package ]
    ++ optional zfsEnabled zfsPackage
    ++ optional config.services.postgresql.enable config.services.postgresql.package;

  # What snapsync.service needs (root: snapshots, receives, /dev/zfs, cgroup.freeze, ssh keys,
  # the network); everything else is taken away. Kept in step with deploy/systemd/.
  hardening = {
    ProtectSystem = "full";
    PrivateTmp = true;
    NoNewPrivileges = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictRealtime = true;
    LockPersonality = true; # not RestrictSUIDSGID: btrfs receive chmod()s setuid and setgid files
    RestrictNamespaces = "mnt"; # a receive into a root that is a subvolume runs in its own mount namespace
    SystemCallArchitectures = "native";
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
    UMask = "0077";
  };

  service = { description, command, extra ? { } }: {
    inherit description;
    wants = [ "network-online.target" ];
    after = [ "network-online.target" "local-fs.target" ] ++ optional zfsEnabled "zfs.target";
    path = tools;
    environment.SNAPSYNC_STATE_DIR = cfg.stateDir;
    restartIfChanged = false;
    serviceConfig = hardening // {
      Type = "oneshot";
      ExecStart = "${snapsync} ${global} ${command}";
      StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
      StateDirectoryMode = "0755"; # node_exporter reads metrics/ below it; the files are 0600
    } // extra;
  };

  timer = { onCalendar, delay, persistent ? true }: {
    wantedBy = [ "timers.target" ];
    timerConfig = {
      OnCalendar = onCalendar;
      Persistent = persistent;
      RandomizedDelaySec = delay;
    };
  };

  rcv = cfg.receive;
  forced = "${snapsync} serve --root ${rcv.root} --role receive${optionalString rcv.appendOnly " --append-only"}";
  # ZFS permissions `snapsync serve --role receive` uses below its root: receive (and the create and
  # mount receive needs, though it never mounts), holds on the newest copy, its user properties,
  # and, unless append-only, destroy and rollback for pruning and on_diverged = "rollback".
  zfsPermissions = [ "create" "mount" "receive" "hold" "release" "userprop" "canmount" ]
    ++ lib.optionals (!rcv.appendOnly) [ "destroy" "rollback" ];
in
{
  options.services.snapsync = {
    enable = mkEnableOption "snapsync: consistency-group snapshots, replication and GFS retention";

    package = mkOption {
      type = types.package;
      default = pkgs.snapsync or (pkgs.python3Packages.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.python3Packages.callPackage ./package.nix { }";
      description = "The snapsync package.";
    };

    policy = mkOption {
      type = toml.type;
      default = { };
      example = lib.literalExpression ''
        {
          version = 1;
          defaults.retention = { hourly = 48; daily = 30; weekly = 8; monthly = 12; };
          groups.forgejo = {
            backend = "btrfs";
            datasets = [ "/persist/var/lib/forgejo" "/persist/var/lib/postgresql" ];
            hooks = [ { type = "postgres"; user = "postgres"; } ];
            targets = [ "nas" "b2" ];
          };
          targets.nas = { type = "ssh"; host = "nas"; user = "snapsync-receive"; path = "tank/backup/forge"; };
          targets.b2 = { type = "s3"; endpoint_url = "https://s3.eu-central-003.backblazeb2.com"; bucket = "forge-backup"; };
        }
      '';
      description = ''
        The policy (docs/policy.md), rendered to /etc/snapsync/policy.toml. Validated at build time
        by `snapsync policy check --syntax-only`. Secrets never go here (snapsync refuses them):
        S3 credentials come from a credentials_file or the environment, the offsite key from key_file.
      '';
    };

    policyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "A policy file to use instead of `policy`.";
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/snapsync";
      description = ''
        Drill results, metrics state, an unfinished rollback's plan. With impermanence, persist it
        (environment.persistence."/persist".directories = [ "/var/lib/snapsync" ]).
      '';
    };

    logFormat = mkOption {
      type = types.enum [ "text" "json" ];
      default = "text";
      description = "One line per event in the journal, as text or JSON (for a log shipper).";
    };

    startAt = mkOption {
      type = types.str;
      default = "hourly";
      description = "When `snapsync run` starts (systemd OnCalendar); each group snapshots when its interval is due.";
    };

    randomizedDelay = mkOption {
      type = types.str;
      default = "5m";
      description = "RandomizedDelaySec of the timers: hosts in a cluster do not all send at once.";
    };

    drill = {
      enable = mkEnableOption "a weekly restore drill (`snapsync drill`) of every group from every target";
      startAt = mkOption { type = types.str; default = "Sun *-*-* 04:00:00"; description = "When the drill starts."; };
    };

    check = {
      enable = mkEnableOption "`snapsync check` every 15 minutes (pings monitoring.ping_url of the policy)";
      startAt = mkOption { type = types.str; default = "*:0/15"; description = "When the check runs."; };
      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/snapsync-check.env";
        description = ''
          A file with SNAPSYNC_PING_URL=https://hc-ping.com/... (from sops-nix or agenix): keeps the ping
          URL, whose path is the check's secret, out of the world-readable Nix store.
        '';
      };
    };

    prometheus = {
      textfileDir = mkOption {
        type = types.str;
        default = "${cfg.stateDir}/metrics";
        defaultText = lib.literalExpression ''"''${config.services.snapsync.stateDir}/metrics"'';
        description = "Where snapsync writes snapsync.prom for node_exporter's textfile collector.";
      };
      configureNodeExporter = mkOption {
        type = types.bool;
        default = config.services.prometheus.exporters.node.enable;
        defaultText = lib.literalExpression "config.services.prometheus.exporters.node.enable";
        description = "Enable node_exporter's textfile collector on textfileDir.";
      };
    };

    receive = {
      enable = mkEnableOption "accepting copies from other hosts over ssh (the receiving role, backup-accept)";
      backend = mkOption {
        type = types.enum [ "btrfs" "zfs" ];
        description = "The filesystem below root.";
      };
      root = mkOption {
        type = types.str;
        example = "tank/backup";
        description = "Copies land below this directory (btrfs) or dataset (zfs); senders cannot leave it.";
      };
      user = mkOption {
        type = types.str;
        default = "snapsync-receive";
        description = ''
          The account senders log in as. On ZFS it needs no root: `zfs allow` delegates what receiving
          needs on root. btrfs receive needs root (it creates subvolumes and sets ownership), so with
          backend = "btrfs" set this to "root".
        '';
      };
      appendOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Senders may add copies, never delete them (retention on this side is then yours to run).";
      };
      authorizedKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Public keys of the sending hosts; each is confined to `snapsync serve` (restrict, forced command).";
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      assertions = [
        {
          assertion = cfg.policyFile != null || cfg.policy != { };
          message = "services.snapsync: set policy (Nix attributes) or policyFile.";
        }
        {
          assertion = lib.hasPrefix "/var/lib/" cfg.stateDir;
          message = "services.snapsync.stateDir must be below /var/lib (it is the units' StateDirectory).";
        }
      ];

      environment.systemPackages = [ cfg.package ];
      environment.etc."snapsync/policy.toml".source = pkgs.runCommand "snapsync-policy-checked.toml" { } ''
        ${snapsync} policy check --syntax-only ${policyFile} > /dev/null
        cp ${policyFile} $out
      '';

      systemd.services.snapsync = service {
        description = "snapsync: snapshots, replication and pruning";
        command = "--verbose run";
        extra = { SuccessExitStatus = 3; Nice = 10; IOSchedulingPriority = 7; TimeoutStartSec = "12h"; TimeoutStopSec = "5min"; };
      };
      systemd.timers.snapsync = timer { onCalendar = cfg.startAt; delay = cfg.randomizedDelay; };

      # Conditions on the leaves: a condition on the whole submodule would need node.enable to decide
      # whether it defines node, and configureNodeExporter's default reads node.enable.
      services.prometheus.exporters.node.enabledCollectors = mkIf cfg.prometheus.configureNodeExporter [ "textfile" ];
      services.prometheus.exporters.node.extraFlags =
        mkIf cfg.prometheus.configureNodeExporter [ "--collector.textfile.directory=${cfg.prometheus.textfileDir}" ];
      systemd.tmpfiles.rules = [ "d ${cfg.prometheus.textfileDir} 0755 root root -" ];
    })

    (mkIf (cfg.enable && cfg.drill.enable) {
      systemd.services.snapsync-drill = service {
        description = "snapsync restore drill";
        command = "--verbose drill --scratch /var/tmp";
        extra = { SuccessExitStatus = 3; Nice = 15; IOSchedulingClass = "idle"; TimeoutStartSec = "24h"; TimeoutStopSec = "5min"; };
      };
      systemd.timers.snapsync-drill = timer { onCalendar = cfg.drill.startAt; delay = "2h"; };
    })

    (mkIf (cfg.enable && cfg.check.enable) {
      systemd.services.snapsync-check = service {
        description = "snapsync freshness check";
        command = "check";
        extra = {
          SuccessExitStatus = 1;
          ProtectSystem = "strict";
          ReadWritePaths = [ "-/root/.ssh" ];
          RestrictSUIDSGID = true;
          ProtectControlGroups = true;
          ProtectKernelTunables = true;
          TimeoutStartSec = "10m";
          EnvironmentFile = lib.mkIf (cfg.check.environmentFile != null) cfg.check.environmentFile;
        };
      };
      systemd.timers.snapsync-check = timer { onCalendar = cfg.check.startAt; delay = "1m"; persistent = false; };
    })

    (mkIf rcv.enable {
      assertions = [
        {
          assertion = rcv.backend == "zfs" || rcv.user == "root";
          message = "services.snapsync.receive: btrfs receive needs root; set user = \"root\".";
        }
      ];

      users.users.${rcv.user} = mkMerge [
        (mkIf (rcv.user != "root") {
          isSystemUser = true;
          group = rcv.user;
          description = "snapsync: receives copies from other hosts";
          shell = pkgs.bashInteractive; # sshd runs the forced command through the login shell
        })
        { openssh.authorizedKeys.keys = map (key: ''command="${forced}",restrict ${key}'') rcv.authorizedKeys; }
      ];
      users.groups = optionalAttrs (rcv.user != "root") { ${rcv.user} = { }; };
      environment.systemPackages = [ cfg.package ];

      systemd.services.snapsync-receive-allow = mkIf (rcv.backend == "zfs" && rcv.user != "root") {
        description = "snapsync: delegate ZFS permissions on ${rcv.root} to ${rcv.user}";
        wantedBy = [ "multi-user.target" ];
        after = [ "zfs.target" ];
        requires = [ "zfs.target" ];
        path = [ zfsPackage ];
        serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
        script = ''
          zfs list -H -o name ${lib.escapeShellArg rcv.root} > /dev/null || zfs create -p -o canmount=off ${lib.escapeShellArg rcv.root}
          zfs allow -u ${lib.escapeShellArg rcv.user} ${lib.concatStringsSep "," zfsPermissions} ${lib.escapeShellArg rcv.root}
        '';
      };
    })
  ];
}
