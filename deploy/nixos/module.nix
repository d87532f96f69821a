# NixOS module for snapsync: the policy as Nix attributes, the units of deploy/systemd/, the receiving
# role, metrics for node_exporter. README.md ("On NixOS") and docs/monitoring.md ("NixOS") show it in
# use; tests/nixos/ evaluates every one of those examples with nixpkgs' module system.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption optional optionals types;

  cfg = config.services.snapsync;
  rcv = cfg.receive;
  toml = pkgs.formats.toml { };
  snapsync = lib.getExe cfg.package;

  # One ExecStart= argument: bare when systemd reads it literally, else quoted, with its variable ($)
  # and specifier (%) characters escaped.
  execArg = arg:
    if builtins.match "[A-Za-z0-9_@+=:,./-]+" arg != null then arg
    else lib.replaceStrings [ "$" "%" ] [ "$$" "%%" ] (builtins.toJSON arg);
  exec = args: lib.concatMapStringsSep " " execArg ([ snapsync "--policy" "/etc/snapsync/policy.toml" ]
    ++ optionals (cfg.logFormat != "text") [ "--log-format" cfg.logFormat ] ++ args);

  # ssh and zstd carry streams; btrfs-progs and zfs snapshot and receive; systemctl for freeze and command
  # hooks. The drill starts PostgreSQL on a restored copy: with the host's own server binaries.
  tools = [ pkgs.openssh pkgs.zstd pkgs.btrfs-progs pkgs.util-linux pkgs.coreutils config.systemd.package ]
    ++ optional config.boot.zfs.enabled config.boot.zfs.package
    ++ optional config.services.postgresql.enable config.services.postgresql.package;

  # The policy (RFC 42 settings): the keys the module or a typo most often gets wrong are typed, so a
  # wrong value names its option at evaluation; everything else passes through to the build-time
  # `snapsync policy check --syntax-only`. Keys left null are not written.
  key = type: description: mkOption { type = types.nullOr type; default = null; inherit description; };
  duration = types.str // { description = "duration (a string like \"90m\", \"36h\" or \"1d12h\")"; };
  count = types.ints.between 0 100000;
  table = options: types.submodule { freeformType = toml.type; inherit options; };

  retention = key (table {
    keep_last = key count "Keep this many newest snapshots.";
    keep_within = key duration "Keep every snapshot younger than this.";
    hourly = key count "Hourly snapshots to keep.";
    daily = key count "Daily snapshots to keep.";
    weekly = key count "Weekly snapshots to keep.";
    monthly = key count "Monthly snapshots to keep.";
    yearly = key count "Yearly snapshots to keep.";
  }) "Retention (docs/retention.md); merged per key over defaults.retention.";

  hook = table {
    type = mkOption {
      type = types.enum [ "postgres" "sqlite" "freeze" "command" ];
      description = "What the hook does around the snapshot (docs/consistency.md).";
    };
    on_failure = key (types.enum [ "abort" "continue" ]) "A failed hook skips the snapshot (abort) or not.";
    timeout = key duration "How long the hook may take.";
    user = key types.str "postgres: the role to connect as.";
    host = key types.str "postgres: the server's host or socket directory.";
    port = key types.port "postgres: the server's port.";
    dbname = key types.str "postgres: the database to connect to.";
    dump = key (types.either (types.enum [ "all" ]) (types.nonEmptyListOf types.str))
      "postgres: databases dumped with pg_dump -Fc into dump_dir before each snapshot (\"all\" or names).";
    dump_dir = key types.str "postgres: where the dumps go; inside one of the group's datasets, so they travel with it.";
    dump_timeout = key duration "postgres: how long one database's dump may take.";
    bin_dir = key types.str "postgres: the directory of pg_dump and pg_restore (default: PATH).";
    databases = key (types.nonEmptyListOf types.str) "sqlite: the database files.";
    unit = key types.str "freeze: the systemd unit whose cgroup is frozen.";
    max_pause = key duration "freeze: the longest the unit may stay frozen.";
    pre = key (types.nonEmptyListOf types.str) "command: argv run before the snapshot (never through a shell).";
    post = key (types.nonEmptyListOf types.str) "command: argv run after the snapshot (never through a shell).";
  };

  # Secrets stay out of the store: key and credential files are strings (paths on the host), never
  # Nix paths, which would be copied into the world-readable store.
  targetKeys = {
    host = key types.str "ssh: the host.";
    user = key types.str "ssh: the user (the receiving host's snapsync-receive, or root).";
    port = key types.port "ssh: the port.";
    path = key types.str "ssh, local, dir: where the copies go (below the receiving role's root for ssh).";
    identity_file = key types.str "ssh: the private key, a path on this host.";
    ssh_options = key (types.listOf types.str) "ssh: extra -o options.";
    command = key (types.nonEmptyListOf types.str) "ssh: snapsync on the other host, as argv.";
    retention = retention;
    max_lag = key duration "Replication may fall this far behind before check warns.";
    warn_after = key duration "check: the newest copy may be this old before WARNING.";
    crit_after = key duration "check: ... and this old before CRITICAL.";
    rate_limit = key types.str "Bytes per second, like \"10M\".";
  };

  target = table (targetKeys // {
    type = mkOption {
      type = types.enum [ "ssh" "local" "dir" "s3" ];
      description = "Where copies go: another host over ssh, a local filesystem, or offsite (dir, s3; docs/offsite.md).";
    };
    on_diverged = key (types.enum [ "refuse" "rollback" ]) "What to do with a copy that diverged.";
    compress = key (types.enum [ "none" "zstd" ]) "Stream compression.";
    compress_level = key (types.ints.between 1 19) "offsite: zstd level.";
    key_file = key types.str "offsite: the key (snapsync keygen), a path on this host.";
    full_every = key (types.either duration types.ints.unsigned) "offsite: a new full chain after this long or this many incrementals.";
    chains = key (types.enum [ "levelled" "linear" ]) "offsite: each upload from its period's base (levelled) or from the one before (linear).";
    chunk_size = key (types.either types.str types.ints.positive) "offsite: chunk size, like \"64M\".";
    endpoint_url = key types.str "s3: the endpoint.";
    bucket = key types.str "s3: the bucket.";
    prefix = key types.str "s3: the key prefix.";
    region = key types.str "s3: the region.";
    profile = key types.str "s3: the profile in the credentials file.";
    credentials_file = key types.str "s3: the credentials file, a path on this host (never the keys themselves).";
  });

  group = table {
    backend = mkOption { type = types.enum [ "btrfs" "zfs" ]; description = "The filesystem of the datasets."; };
    datasets = mkOption {
      type = types.nonEmptyListOf types.str;
      description = "Subvolume paths (btrfs) or dataset names (zfs), snapshotted together.";
    };
    interval = key duration "How often the group is snapshotted.";
    prefix = key types.str "Snapshot name prefix.";
    timezone = key types.str "Time zone of the retention calendar.";
    snapshot_dir = key types.str "btrfs: where snapshots go.";
    retention = retention;
    hooks = key (types.listOf hook) "Hooks run around each snapshot.";
    targets = key (types.listOf types.str) "Names of targets the group replicates to.";
    send_raw = key types.bool "zfs: send raw streams.";
    send_compressed = key types.bool "zfs: send compressed blocks as stored.";
    warn_after = key duration "check: the newest snapshot may be this old before WARNING.";
    crit_after = key duration "check: ... and this old before CRITICAL.";
    hold_expiry = key duration "How long leftovers of a holder that stopped (pull holds, bookmarks) are kept.";
    exclude = key (types.listOf types.str) "Nested subvolumes or datasets left out of this group on purpose (no warning).";
  };

  pull = table (targetKeys // {
    host = mkOption { type = types.str; description = "The source host."; };
    datasets = mkOption { type = types.nonEmptyListOf types.str; description = "The source's datasets."; };
    into = mkOption { type = types.str; description = "Where the copies go on this host."; };
    prefix = key types.str "Only snapshots with this prefix.";
  });

  policyModule = {
    freeformType = toml.type;
    options = {
      version = mkOption { type = types.enum [ 1 ]; default = 1; description = "The policy format's version."; };
      host = key types.str "This host's name in targets and holds (default: the hostname).";
      defaults = key (table {
        prefix = key types.str "Snapshot name prefix.";
        timezone = key types.str "Time zone of the retention calendar.";
        interval = key duration "How often groups are snapshotted.";
        snapshot_dir = key types.str "btrfs: where snapshots go.";
        warn_after = key duration "check: WARNING after this.";
        crit_after = key duration "check: CRITICAL after this.";
        hold_expiry = key duration "How long leftovers of a holder that stopped (pull holds, bookmarks) are kept.";
        inherit retention;
      }) "What groups leave out.";
      groups = mkOption { type = types.attrsOf group; default = { }; description = "Consistency groups."; };
      targets = mkOption { type = types.attrsOf target; default = { }; description = "Where groups replicate to."; };
      pulls = mkOption { type = types.attrsOf pull; default = { }; description = "Copies this host fetches from others."; };
      monitoring = key (table {
        textfile = key types.str "Prometheus textfile (default: prometheus.textfileDir/snapsync.prom).";
        ping_url = key types.str "A healthchecks-style URL: it lands in the world-readable store; prefer check.environmentFile.";
        ping_timeout = key duration "How long the ping may take.";
      }) "Metrics and pings.";
    };
  };

  withoutNulls = value:
    if builtins.isAttrs value then lib.mapAttrs (_: withoutNulls) (lib.filterAttrs (_: v: v != null) value)
    else if builtins.isList value then map withoutNulls value
    else value;

  policyTextfile = if cfg.policy != null && cfg.policy.monitoring != null then cfg.policy.monitoring.textfile else null;
  textfileDir =
    if cfg.prometheus.textfileDir != null then cfg.prometheus.textfileDir
    else if policyTextfile != null then dirOf policyTextfile
    else "${cfg.stateDir}/metrics";
  textfile = if policyTextfile != null then policyTextfile else "${textfileDir}/snapsync.prom";

  rendered = toml.generate "snapsync-policy.toml"
    (lib.recursiveUpdate (withoutNulls cfg.policy) { monitoring.textfile = textfile; });

  # A Nix path or a store path is checked when the system is built; any other file is the host's at
  # run time (a secret from sops-nix or agenix): never read at build time, linked from /etc as it is.
  inStore = file: builtins.isPath file || lib.hasPrefix "${builtins.storeDir}/" (toString file);
  checked = policy: pkgs.runCommand "snapsync-policy.toml" { inherit policy; } ''
    ${snapsync} policy check --syntax-only "$policy" > /dev/null
    cp "$policy" "$out"
  '';
  policySource =
    if cfg.policyFile == null then checked rendered
    else if inStore cfg.policyFile then checked cfg.policyFile
    else cfg.policyFile;

  # Kept in step with deploy/systemd/ (tests/nixos/ compares them key by key).
  sandbox = {
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
  stateDirectory = {
    StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
    StateDirectoryMode = "0755"; # node_exporter reads metrics/ below it; the state files are 0600
  };
  unit = { description, after, serviceConfig, startAt }: {
    inherit description after startAt;
    wants = [ "network-online.target" ];
    path = tools;
    environment.SNAPSYNC_STATE_DIR = cfg.stateDir;
    restartIfChanged = false;
    serviceConfig = { Type = "oneshot"; } // serviceConfig;
  };
  timer = { description, delay, extra ? { } }: {
    inherit description;
    timerConfig = { RandomizedDelaySec = delay; } // extra;
  };
  startAtOption = default: description: mkOption {
    type = types.either types.str (types.listOf types.str);
    inherit default;
    description = "${description} (systemd OnCalendar; a list for several).";
  };
  extraArgsOption = command: mkOption {
    type = types.listOf types.str;
    default = [ ];
    example = [ "--lock-timeout" "300" ];
    description = "Extra arguments of `snapsync ${command}`.";
  };

  # The authorized_keys lines are printed by the package's own `snapsync authorize` when the system
  # is built: the forced command is quoted exactly as the CLI quotes it, and a key it refuses fails the build.
  authorizeArgs = [ "--root" rcv.root "--role" "receive" "--command" snapsync ]
    ++ optional rcv.appendOnly "--append-only" ++ optional rcv.allowRestore "--allow-restore";
  authorizedKeys = pkgs.runCommand "snapsync-authorized-keys" { } (''
    touch "$out"
  '' + lib.concatMapStrings (k: ''
    printf '%s\n' ${lib.escapeShellArg k} > key.pub
    ${snapsync} authorize ${lib.escapeShellArgs authorizeArgs} key.pub >> "$out"
  '') rcv.authorizedKeys);
  keysDir = "ssh/snapsync_authorized_keys.d";

  # ZFS permissions `snapsync serve --role receive` uses below its root: receive (and the create and
  # mount receive needs, though it never mounts), holds on the newest copy, its user properties; unless
  # append-only, destroy and rollback for pruning and on_diverged = "rollback"; with restores, send.
  zfsPermissions = [ "create" "mount" "receive" "hold" "release" "userprop" "canmount" ]
    ++ optionals (!rcv.appendOnly) [ "destroy" "rollback" ]
    ++ optional rcv.allowRestore "send";
  zfsRoot = lib.escapeShellArg rcv.root;
  zfsUser = lib.escapeShellArg rcv.user;
in
{
  options.services.snapsync = {
    enable = mkEnableOption "snapsync: consistency-group snapshots, replication and GFS retention";

    package = lib.mkPackageOption
      (pkgs // { snapsync = pkgs.snapsync or (pkgs.python3Packages.callPackage ./package.nix { }); })
      "snapsync"
      { extraDescription = "Without an overlay that provides it, built from this source tree (deploy/nixos/package.nix)."; };

    policy = mkOption {
      type = types.nullOr (types.submodule policyModule);
      default = null;
      example = lib.literalExpression ''
        {
          defaults.retention = { hourly = 48; daily = 30; weekly = 8; monthly = 12; };
          groups.forgejo = {
            backend = "btrfs";
            datasets = [ "/persist/system/var/lib/forgejo" "/persist/system/var/lib/postgresql" ];
            hooks = [ { type = "postgres"; user = "postgres"; } ];
            targets = [ "nas" "b2" ];
          };
          targets.nas = { type = "ssh"; host = "nas"; user = "snapsync-receive"; path = "tank/backup/forge"; };
          targets.b2 = { type = "s3"; endpoint_url = "https://s3.eu-central-003.backblazeb2.com"; bucket = "forge-backup"; };
        }
      '';
      description = ''
        The policy (docs/policy.md) as Nix attributes, rendered to /etc/snapsync/policy.toml and checked
        with `snapsync policy check --syntax-only` when the system is built. Secrets never go here (snapsync
        refuses them): S3 credentials come from credentials_file or the environment, the offsite key from key_file.
      '';
    };

    policyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/snapsync-policy.toml";
      description = ''
        A policy file instead of `policy`. A Nix path (./policy.toml) is copied into the store and checked
        when the system is built; a string outside the store is the host's file, read only at run time
        (/etc/snapsync/policy.toml links to it) and never copied into the store.
      '';
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

    startAt = startAtOption "hourly" "When `snapsync run` starts; each group snapshots when its interval is due";
    randomizedDelay = mkOption {
      type = types.str;
      default = "5m";
      description = "RandomizedDelaySec of the run's timer: hosts in a cluster do not all send at once.";
    };
    extraArgs = extraArgsOption "run";

    drill = {
      enable = mkEnableOption "a weekly restore drill (`snapsync drill`) of every group from every target";
      startAt = startAtOption "Sun *-*-* 04:00:00" "When the drill starts";
      extraArgs = extraArgsOption "drill";
    };

    check = {
      enable = mkEnableOption "`snapsync check` every 15 minutes (pings monitoring.ping_url of the policy)";
      startAt = startAtOption "*:0/15" "When the check runs";
      extraArgs = extraArgsOption "check";
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
        type = types.nullOr types.str;
        default = null;
        description = ''
          Where snapsync.prom goes, for node_exporter's textfile collector. Default: the directory of the
          policy's monitoring.textfile if it sets one, else stateDir/metrics.
        '';
      };
      configureNodeExporter = mkOption {
        type = types.bool;
        default = config.services.prometheus.exporters.node.enable;
        defaultText = lib.literalExpression "config.services.prometheus.exporters.node.enable";
        description = "Enable node_exporter's textfile collector on that directory.";
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
        type = types.passwdEntry types.str;
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
      allowRestore = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Senders may also read their copies back (`snapsync restore --from`, the weekly drill): adds
          --allow-restore to their forced command and, on ZFS, `send` to the delegated permissions
          (docs/replication.md, "Restores and drills from a backup host").
        '';
      };
      authorizedKeys = mkOption {
        type = types.listOf (types.strMatching "(ssh-|ecdsa-|sk-)[^[:space:]]+[[:space:]]+[^[:space:]]+([[:blank:]][^[:cntrl:]]*)?"
          // { description = "public key line (\"ssh-ed25519 AAAA... root@host\", without options)"; });
        default = [ ];
        example = [ "ssh-ed25519 AAAA... root@laptop" ];
        description = ''
          Public keys of the sending hosts, each a plain key line (`snapsync authorize` adds the options):
          confined to `snapsync serve` by `restrict` and a forced command.
        '';
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      assertions = [
        {
          assertion = (cfg.policy != null) != (cfg.policyFile != null);
          message = "services.snapsync: set exactly one of policy (Nix attributes) and policyFile.";
        }
        {
          assertion = lib.hasPrefix "/var/lib/" cfg.stateDir;
          message = "services.snapsync.stateDir must be below /var/lib (it is the units' StateDirectory).";
        }
        {
          assertion = dirOf textfile == textfileDir;
          message = "services.snapsync.policy.monitoring.textfile (${textfile}) must be in services.snapsync.prometheus.textfileDir (${textfileDir}), where node_exporter reads.";
        }
      ];
      warnings =
        optional (cfg.policyFile != null && cfg.prometheus.textfileDir != null && cfg.prometheus.textfileDir != "${cfg.stateDir}/metrics")
          "services.snapsync.prometheus.textfileDir: set [monitoring] textfile = \"${textfile}\" in policyFile too, or snapsync writes its metrics elsewhere."
        ++ optional (cfg.policy != null && cfg.policy.monitoring != null && cfg.policy.monitoring.ping_url != null)
          "services.snapsync.policy.monitoring.ping_url is in the world-readable Nix store; set it in check.environmentFile (SNAPSYNC_PING_URL=...) instead.";

      environment.systemPackages = [ cfg.package ];
      environment.etc."snapsync/policy.toml".source = policySource;

      systemd.services.snapsync = unit {
        description = "snapsync: snapshots, replication and pruning";
        after = [ "network-online.target" "local-fs.target" "zfs.target" "postgresql.service" ];
        startAt = cfg.startAt;
        serviceConfig = {
          ExecStart = exec ([ "--verbose" "run" ] ++ cfg.extraArgs);
          SuccessExitStatus = 3; # another run holds the lock: the timer comes again
          Nice = 10;
          IOSchedulingClass = "best-effort";
          IOSchedulingPriority = 7;
          TimeoutStartSec = "12h";
          # SIGTERM to the whole cgroup: a freeze hook's watchdog thaws at once even if snapsync cannot.
          KillMode = "control-group";
          TimeoutStopSec = "5min";
          KeyringMode = "private";
        } // stateDirectory // sandbox;
      };
      systemd.timers.snapsync = timer {
        description = "snapsync run (snapshots only when a group's interval is due)";
        delay = cfg.randomizedDelay;
        extra = { Persistent = true; AccuracySec = "1m"; };
      };

      # Conditions on the leaves: a condition on the whole submodule would need node.enable to decide
      # whether it defines node, and configureNodeExporter's default reads node.enable.
      services.prometheus.exporters.node.enabledCollectors = mkIf cfg.prometheus.configureNodeExporter [ "textfile" ];
      services.prometheus.exporters.node.extraFlags =
        mkIf cfg.prometheus.configureNodeExporter [ "--collector.textfile.directory=${textfileDir}" ];
      systemd.tmpfiles.rules = [ "d ${textfileDir} 0755 root root -" ];
    })

    (mkIf (cfg.enable && cfg.drill.enable) {
      systemd.services.snapsync-drill = unit {
        description = "snapsync restore drill";
        after = [ "network-online.target" "local-fs.target" "zfs.target" "snapsync.service" ];
        startAt = cfg.drill.startAt;
        serviceConfig = {
          ExecStart = exec ([ "--verbose" "drill" "--scratch" "/var/tmp" ] ++ cfg.drill.extraArgs);
          SuccessExitStatus = 3;
          Nice = 15;
          IOSchedulingClass = "idle";
          TimeoutStartSec = "24h";
          TimeoutStopSec = "5min";
        } // stateDirectory // sandbox;
      };
      systemd.timers.snapsync-drill = timer {
        description = "snapsync restore drill, weekly";
        delay = "2h";
        extra.Persistent = true;
      };
    })

    (mkIf (cfg.enable && cfg.check.enable) {
      systemd.services.snapsync-check = unit {
        description = "snapsync freshness check";
        after = [ "network-online.target" ];
        startAt = cfg.check.startAt;
        serviceConfig = {
          ExecStart = exec ([ "check" ] ++ cfg.check.extraArgs);
          SuccessExitStatus = 1; # WARNING is not a unit failure; CRITICAL and UNKNOWN are
          TimeoutStartSec = "10m";
          # check only reads: it lists snapshots and asks the targets.
          ProtectSystem = "strict";
          ReadWritePaths = [ "-/root/.ssh" ];
          PrivateTmp = true;
          PrivateDevices = false;
          NoNewPrivileges = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectKernelTunables = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RestrictNamespaces = true;
          SystemCallArchitectures = "native";
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
          UMask = "0077";
        } // lib.optionalAttrs (cfg.check.environmentFile != null) { EnvironmentFile = cfg.check.environmentFile; };
      };
      systemd.timers.snapsync-check = timer { description = "snapsync freshness check every 15 minutes"; delay = "1m"; };
    })

    (mkIf rcv.enable {
      assertions = [
        {
          assertion = rcv.backend == "zfs" || rcv.user == "root";
          message = "services.snapsync.receive: btrfs receive needs root; set user = \"root\".";
        }
        {
          assertion = (rcv.backend == "btrfs") == lib.hasPrefix "/" rcv.root;
          message = "services.snapsync.receive.root: a directory (/...) for btrfs, a dataset name (pool/...) for zfs; got \"${rcv.root}\" with backend = \"${rcv.backend}\".";
        }
        {
          assertion = rcv.backend != "zfs" || config.boot.zfs.enabled;
          message = "services.snapsync.receive.backend = \"zfs\" needs ZFS on this host (boot.supportedFilesystems.zfs = true).";
        }
      ];

      users.users = lib.optionalAttrs (rcv.user != "root") {
        ${rcv.user} = {
          isSystemUser = true;
          group = rcv.user;
          description = "snapsync receiving account (copies from other hosts)";
          shell = pkgs.bashInteractive; # sshd runs the forced command through the login shell
        };
      };
      users.groups = lib.optionalAttrs (rcv.user != "root") { ${rcv.user} = { }; };
      environment.systemPackages = [ cfg.package ];

      services.openssh.enable = lib.mkDefault true;
      # Read after the user's own files: a key listed there without restrictions keeps them (sshd uses
      # the first line that matches a key).
      services.openssh.authorizedKeysFiles = lib.mkAfter [ "/etc/${keysDir}/%u" ];
      # A copy, not a link into the store: sshd's StrictModes refuses the group-writable /nix/store.
      environment.etc."${keysDir}/${rcv.user}" = { source = authorizedKeys; mode = "0444"; };

      systemd.services.snapsync-receive-allow = mkIf (rcv.backend == "zfs" && rcv.user != "root") {
        description = "snapsync: delegate ZFS permissions on ${rcv.root} to ${rcv.user}";
        wantedBy = [ "multi-user.target" ];
        after = [ "zfs.target" ];
        requires = [ "zfs.target" ];
        path = [ config.boot.zfs.package ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ProtectSystem = "full";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateNetwork = true;
          NoNewPrivileges = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RestrictNamespaces = true;
          SystemCallArchitectures = "native";
          RestrictAddressFamilies = [ "AF_UNIX" ];
          UMask = "0077";
        };
        # Exactly this configuration's set: what an earlier one delegated (before appendOnly, with
        # allowRestore) is taken back first.
        script = ''
          zfs list -H -o name ${zfsRoot} > /dev/null || zfs create -p -o canmount=off ${zfsRoot}
          zfs unallow -u ${zfsUser} ${zfsRoot}
          zfs allow -u ${zfsUser} ${lib.concatStringsSep "," zfsPermissions} ${zfsRoot}
        '';
        # A changed unit is stopped with its old definition (stopIfChanged), and a removed one too: a
        # user or root that changes, or a role that goes, takes its permissions with it.
        preStop = ''
          if zfs list -H -o name ${zfsRoot} > /dev/null 2>&1; then
            zfs unallow -u ${zfsUser} ${zfsRoot}
          fi
        '';
      };
    })
  ];
}
