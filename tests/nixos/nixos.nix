# The part of NixOS that deploy/nixos/module.nix touches, declared with the types NixOS gives those
# options (nixos/modules/config/users-groups.nix, nixos/lib/systemd-unit-options.nix, etc.nix, sshd.nix,
# the node exporter, postgresql, zfs, top-level.nix's checks and assertions; impermanence for the docs'
# examples), and a pkgs with just the packages and builders the module uses. Derivations are stand-ins
# that remember how they would be built, so the tests can run their build scripts as the sandbox would.
# Units are rendered to text the way nixos/lib/systemd-lib.nix does.
{ lib }:

let
  inherit (lib) mkOption types;

  storePath = seed: name: "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" seed)}-${name}";
  drv = name: attrs: attrs // { type = "derivation"; inherit name; outPath = storePath (name + attrs.script or "") name; };
  program = name: main: drv name { meta.mainProgram = main; };
  shell = name: path: drv name { shellPath = path; };

  # pkgs.formats.toml: the type of nixpkgs' pkgs-lib/formats.nix; generate keeps the value to render.
  tomlValue = types.oneOf [ types.bool types.int types.float types.str types.path (types.attrsOf tomlValue) (types.listOf tomlValue) ]
    // { description = "TOML value"; };

  pythonPackages = {
    inherit lib;
    callPackage = lib.callPackageWith pythonPackages;
    buildPythonApplication = args: drv "${args.pname}-${args.version}" { inherit (args) meta; src = args.src; };
  } // lib.genAttrs [ "setuptools" "pydantic" "typer" "rich" "tenacity" "btrfsutil" "tzdata" "tomli-w" "psycopg"
    "boto3" "cryptography" "zstandard" "prometheus-client" ] (name: drv "python3-${name}" { });

  pkgs = {
    inherit lib;
    formats.toml = { }: {
      type = tomlValue;
      generate = name: value: drv name { tomlValue = value; };
    };
    runCommand = name: env: script: drv name { inherit env script; };
    writeText = name: text: drv name { inherit text; };
    python3Packages = pythonPackages;
    bashInteractive = shell "bash-interactive" "/bin/bash";
    shadow = shell "shadow" "/bin/nologin";
  } // lib.genAttrs [ "openssh" "zstd" "btrfs-progs" "util-linux" "coreutils" "findutils" "gnugrep" "gnused"
    "systemd" "zfs" "postgresql" ] (name: drv name { });

  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # A repeatable option when every definition is a list, else one value all definitions agree on.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs;
      in if builtins.isList (builtins.head defs').value
        then lib.concatMap (def:
          if builtins.isList def.value then def.value
          else throw "The definitions for systemd unit options should be either all lists, representing repeatable options, or all non-lists, but for the option ${lib.showOption loc}, the definitions are a mix of list and non-list") defs'
        else lib.mergeEqualOption loc defs';
  };
  checkService = attrs:
    let bad = key: allowed: attrs ? ${key} && !builtins.elem attrs.${key} allowed;
    in !(bad "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ]
      || bad "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ]);

  unitList = description: mkOption { type = types.listOf unitNameType; default = [ ]; inherit description; };
  commonUnit = { config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; description = "Whether the unit is enabled."; };
      description = mkOption { type = types.singleLineStr; default = ""; description = "Description="; };
      documentation = mkOption { type = types.listOf types.str; default = [ ]; description = "Documentation="; };
      wantedBy = unitList "[Install] WantedBy=";
      requiredBy = unitList "RequiredBy=";
      aliases = unitList "Aliases.";
      requires = unitList "Requires=";
      wants = unitList "Wants=";
      after = unitList "After=";
      before = unitList "Before=";
      bindsTo = unitList "BindsTo=";
      partOf = unitList "PartOf=";
      conflicts = unitList "Conflicts=";
      requisite = unitList "Requisite=";
      onFailure = unitList "OnFailure=";
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; description = "[Unit] section."; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; description = "Restart triggers."; };
    };
    config.unitConfig =
      let nonEmpty = key: value: lib.optionalAttrs (value != [ ]) { ${key} = toString value; };
      in nonEmpty "Requires" config.requires // nonEmpty "Wants" config.wants // nonEmpty "After" config.after
        // nonEmpty "Before" config.before // nonEmpty "BindsTo" config.bindsTo // nonEmpty "PartOf" config.partOf
        // nonEmpty "Conflicts" config.conflicts // nonEmpty "Requisite" config.requisite
        // nonEmpty "OnFailure" config.onFailure // nonEmpty "Documentation" config.documentation
        // lib.optionalAttrs (config.description != "") { Description = config.description; };
  };

  # nixos/lib/systemd-unit-options.nix: a script becomes a store program; PATH comes from `path`.
  jobScript = name: text: "${drv "unit-script-${name}" { }}/bin/${name}";
  service = { name, config, ... }: {
    imports = [ commonUnit ];
    options = {
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
        description = "Environment variables.";
      };
      path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; description = "PATH."; };
      serviceConfig = mkOption { type = types.addCheck (types.attrsOf unitOption) checkService; default = { }; description = "[Service] section."; };
      script = mkOption { type = types.lines; default = ""; description = "The main process, a shell script."; };
      scriptArgs = mkOption { type = types.str; default = ""; description = "Its arguments."; };
      preStart = mkOption { type = types.lines; default = ""; description = "ExecStartPre script."; };
      postStart = mkOption { type = types.lines; default = ""; description = "ExecStartPost script."; };
      preStop = mkOption { type = types.lines; default = ""; description = "ExecStop script."; };
      postStop = mkOption { type = types.lines; default = ""; description = "ExecStopPost script."; };
      restartIfChanged = mkOption { type = types.bool; default = true; description = "X-RestartIfChanged."; };
      reloadIfChanged = mkOption { type = types.bool; default = false; description = "X-ReloadIfChanged."; };
      stopIfChanged = mkOption { type = types.bool; default = true; description = "X-StopIfChanged."; };
      startAt = mkOption {
        type = types.either types.str (types.listOf types.str);
        default = [ ];
        description = "OnCalendar of the unit's timer.";
        apply = v: if builtins.isList v then v else [ v ];
      };
      jobs = mkOption { type = types.attrsOf types.str; default = { }; internal = true; description = "Program path -> script (for the tests)."; };
    };
    config = lib.mkMerge [
      { path = lib.mkAfter [ pkgs.coreutils pkgs.findutils pkgs.gnugrep pkgs.gnused pkgs.systemd ];
        environment.PATH = lib.mkIf (config.path != [ ])
          "${lib.makeBinPath config.path}:${lib.makeSearchPathOutput "bin" "sbin" config.path}"; }
      (lib.mkIf (config.script != "") (let p = jobScript "${name}-start" config.script; in {
        serviceConfig.ExecStart = p + " " + config.scriptArgs; jobs.${p} = config.script; }))
      (lib.mkIf (config.preStart != "") (let p = jobScript "${name}-pre-start" config.preStart; in {
        serviceConfig.ExecStartPre = [ p ]; jobs.${p} = config.preStart; }))
      (lib.mkIf (config.postStart != "") (let p = jobScript "${name}-post-start" config.postStart; in {
        serviceConfig.ExecStartPost = [ p ]; jobs.${p} = config.postStart; }))
      (lib.mkIf (config.preStop != "") (let p = jobScript "${name}-pre-stop" config.preStop; in {
        serviceConfig.ExecStop = p; jobs.${p} = config.preStop; }))
      (lib.mkIf (config.postStop != "") (let p = jobScript "${name}-post-stop" config.postStop; in {
        serviceConfig.ExecStopPost = p; jobs.${p} = config.postStop; }))
    ];
  };
  timer = {
    imports = [ commonUnit ];
    options.timerConfig = mkOption { type = types.attrsOf unitOption; default = { }; description = "[Timer] section."; };
  };

  # nixos/lib/systemd-lib.nix: attrsToSection, serviceToUnit, timerToUnit.
  toOption = x: if x == true then "true" else if x == false then "false" else toString x;
  section = attrs: lib.concatStrings (lib.concatLists (lib.mapAttrsToList (name: value:
    map (x: "${name}=${toOption x}\n") (if builtins.isList value then value else [ value ])) attrs));
  unitText = def: body:
    "[Unit]\n${section def.unitConfig}\n" + body
    + lib.optionalString (def.wantedBy != [ ]) "\n[Install]\nWantedBy=${lib.concatStringsSep " " def.wantedBy}\n";
  serviceText = globalEnv: def: unitText def ("[Service]\n"
    + lib.concatMapStrings (n: lib.optionalString ((globalEnv // def.environment).${n} != null)
        "Environment=${builtins.toJSON "${n}=${(globalEnv // def.environment).${n}}"}\n")
      (builtins.attrNames (globalEnv // def.environment))
    + (if def.reloadIfChanged then "X-ReloadIfChanged=true\n" else if !def.restartIfChanged then "X-RestartIfChanged=false\n" else "")
    + lib.optionalString (!def.stopIfChanged) "X-StopIfChanged=false\n"
    + section def.serviceConfig);
  timerText = def: unitText def "[Timer]\n${section def.timerConfig}\n";

  user = { name, config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; description = "Create the account."; };
      name = mkOption { type = types.passwdEntry types.str; description = "The account's name."; };
      description = mkOption { type = types.passwdEntry types.str; default = ""; description = "GECOS field."; };
      uid = mkOption { type = types.nullOr types.int; default = null; description = "UID."; };
      isSystemUser = mkOption { type = types.bool; default = false; description = "A system account."; };
      isNormalUser = mkOption { type = types.bool; default = false; description = "A real user's account."; };
      group = mkOption { type = types.str; default = ""; description = "Primary group."; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; description = "Other groups."; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; description = "Home."; };
      createHome = mkOption { type = types.bool; default = false; description = "Create the home."; };
      shell = mkOption {
        type = types.nullOr (types.either types.shellPackage (types.passwdEntry types.path));
        default = pkgs.shadow;
        description = "Login shell.";
      };
      hashedPassword = mkOption { type = types.nullOr (types.passwdEntry types.str); default = null; description = "Password hash."; };
      openssh.authorizedKeys.keys = mkOption { type = types.listOf types.singleLineStr; default = [ ]; description = "Public keys."; };
      openssh.authorizedKeys.keyFiles = mkOption { type = types.listOf types.path; default = [ ]; description = "Public key files."; };
    };
    config.name = lib.mkDefault name;
  };
  group = { name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; description = "The group's name."; };
      gid = mkOption { type = types.nullOr types.int; default = null; description = "GID."; };
      members = mkOption { type = types.listOf (types.passwdEntry types.str); default = [ ]; description = "Members."; };
    };
    config.name = lib.mkDefault name;
  };
  etcFile = { name, config, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; description = "Whether the file is created."; };
      target = mkOption { type = types.str; default = name; description = "Path below /etc."; };
      text = mkOption { type = types.nullOr types.lines; default = null; description = "Contents."; };
      source = mkOption { type = types.path; description = "The file it links to (or copies, with mode)."; };
      mode = mkOption { type = types.str; default = "symlink"; description = "symlink, or the mode of a copy."; };
      user = mkOption { type = types.str; default = "+0"; description = "Owner of a copy."; };
      group = mkOption { type = types.str; default = "+0"; description = "Group of a copy."; };
    };
    config.source = lib.mkIf (config.text != null) (pkgs.writeText "etc-${baseNameOf name}" config.text);
  };

  nixos = { config, ... }: {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; internal = true; description = "Assertions."; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; internal = true; description = "Warnings."; };
      system.checks = mkOption { type = types.listOf types.package; default = [ ]; description = "Built with the system."; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; description = "Packages."; };
      environment.etc = mkOption { type = types.attrsOf (types.submodule etcFile); default = { }; description = "/etc."; };
      users.users = mkOption { type = types.attrsOf (types.submodule user); default = { }; description = "Accounts."; };
      users.groups = mkOption { type = types.attrsOf (types.submodule group); default = { }; description = "Groups."; };
      systemd.package = mkOption { type = types.package; default = pkgs.systemd; description = "systemd."; };
      systemd.globalEnvironment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
        description = "Environment of every unit.";
      };
      systemd.services = mkOption { type = types.attrsOf (types.submodule service); default = { }; description = "Services."; };
      systemd.timers = mkOption { type = types.attrsOf (types.submodule timer); default = { }; description = "Timers."; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; description = "tmpfiles.d lines."; };
      services.openssh.enable = mkOption { type = types.bool; default = false; description = "sshd."; };
      services.openssh.authorizedKeysFiles = mkOption { type = types.listOf types.str; default = [ ]; description = "AuthorizedKeysFile."; };
      services.prometheus.exporters.node = mkOption {
        type = types.submodule {
          options = {
            enable = mkOption { type = types.bool; default = false; description = "node_exporter."; };
            port = mkOption { type = types.port; default = 9100; description = "Port."; };
            extraFlags = mkOption { type = types.listOf types.str; default = [ ]; description = "Extra flags."; };
            enabledCollectors = mkOption { type = types.listOf types.str; default = [ ]; description = "Collectors to enable."; };
            disabledCollectors = mkOption { type = types.listOf types.str; default = [ ]; description = "Collectors to disable."; };
          };
        };
        default = { };
        description = "node_exporter.";
      };
      services.postgresql.enable = mkOption { type = types.bool; default = false; description = "PostgreSQL."; };
      services.postgresql.package = mkOption { type = types.package; default = pkgs.postgresql; description = "Its package."; };
      boot.supportedFilesystems = mkOption {
        type = types.coercedTo (types.listOf types.str) (fs: lib.genAttrs fs (_: true)) (types.attrsOf types.bool);
        default = { };
        description = "Filesystems the system supports.";
      };
      boot.zfs.enabled = mkOption {
        type = types.bool;
        readOnly = true;
        default = config.boot.supportedFilesystems.zfs or false;
        internal = true;
        description = "Whether ZFS is available.";
      };
      boot.zfs.package = mkOption { type = types.package; default = pkgs.zfs; description = "ZFS."; };
      # nix-community/impermanence, which the docs' examples use.
      environment.persistence = mkOption {
        type = types.attrsOf (types.submodule {
          freeformType = types.attrsOf types.anything;
          options.directories = mkOption { type = types.listOf (types.either types.str (types.attrsOf types.anything)); default = [ ]; description = "Persisted directories."; };
          options.files = mkOption { type = types.listOf (types.either types.str (types.attrsOf types.anything)); default = [ ]; description = "Persisted files."; };
        });
        default = { };
        description = "Persisted paths.";
      };
    };
    config = {
      # nixos/modules/system/boot/systemd.nix: startAt makes a timer.
      systemd.timers = lib.mapAttrs (_: s: { wantedBy = [ "timers.target" ]; timerConfig.OnCalendar = s.startAt; })
        (lib.filterAttrs (_: s: s.enable && s.startAt != [ ]) config.systemd.services);
      users.users.root = { uid = 0; description = "System administrator"; home = "/root"; group = "root"; };
      users.users.nobody = { uid = 65534; isSystemUser = true; description = "Unprivileged account (don't use!)"; group = "nogroup"; };
      users.groups = { root.gid = 0; nogroup.gid = 65534; };
      # users-groups.nix
      assertions = lib.concatLists (lib.mapAttrsToList (_: u: [
        { assertion = u.uid != null || u.isSystemUser != u.isNormalUser;
          message = "Exactly one of users.users.${u.name}.isSystemUser and users.users.${u.name}.isNormalUser must be set."; }
        { assertion = u.group != "";
          message = "users.users.${u.name}.group is unset."; }
        { assertion = u.group == "" || builtins.elem u.group (lib.mapAttrsToList (_: g: g.name) config.users.groups);
          message = "users.users.${u.name}.group=${u.group} does not exist."; }
      ]) config.users.users);
    };
  };

  isStandIn = v: builtins.isAttrs v && v ? outPath && lib.hasPrefix "/nix/store/" v.outPath;
  # What a stand-in derivation remembers, for the tests to run as the sandbox would.
  build = v:
    if isStandIn v then
      { path = v.outPath; }
      // lib.optionalAttrs (v ? script) { inherit (v) script; env = lib.mapAttrs (_: build) v.env; }
      // lib.optionalAttrs (v ? tomlValue) { toml = v.tomlValue; }
    else { path = toString v; };

  evaluate = modules: lib.evalModules {
    modules = [ nixos { _module.args.pkgs = pkgs; } ] ++ modules;
  };

  report = ev:
    let
      c = ev.config;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
      ours = lib.filterAttrs (name: _: lib.hasPrefix "snapsync" name);
    in
    if failed != [ ] then throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}"
    else {
      services = lib.mapAttrs (_: s: serviceText c.systemd.globalEnvironment s) (ours c.systemd.services);
      timers = lib.mapAttrs (_: timerText) (ours c.systemd.timers);
      jobs = lib.foldl' (a: s: a // s.jobs) { } (builtins.attrValues (ours c.systemd.services));
      users = lib.mapAttrs (_: u: {
        inherit (u) name description uid isSystemUser isNormalUser group home;
        shell = if builtins.isAttrs u.shell then u.shell.shellPath else u.shell;
        keys = u.openssh.authorizedKeys.keys;
      }) c.users.users;
      groups = builtins.attrNames c.users.groups;
      etc = lib.mapAttrs (_: f: { inherit (f) mode; source = build f.source; }) (lib.filterAttrs (_: f: f.enable) c.environment.etc);
      packages = map (p: p.outPath) c.environment.systemPackages;
      tmpfiles = c.systemd.tmpfiles.rules;
      openssh = { inherit (c.services.openssh) enable authorizedKeysFiles; };
      nodeExporter = { inherit (c.services.prometheus.exporters.node) enable enabledCollectors extraFlags; };
      checks = map build c.system.checks;
      inherit (c) warnings;
      snapsyncExe = lib.getExe c.services.snapsync.package;
    };
in
{
  inherit pkgs evaluate report lib;
  # The files the package's source filter (deploy/nixos/source.nix) lets through, walked as builtins.path walks.
  sourceFiles = src:
    let
      walk = dir: rel: lib.concatLists (lib.mapAttrsToList (name: type:
        let path = "${dir}/${name}"; relPath = if rel == "" then name else "${rel}/${name}"; in
        if !src.filter path type then [ ]
        else if type == "directory" then walk path relPath
        else [ relPath ]) (builtins.readDir dir));
    in walk (toString src.origSrc) "";
}
