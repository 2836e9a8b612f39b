# NixOS module `services.nip`: the options of nixpkgs' `services.ncps` (same names, types and
# defaults, so a configuration switches by renaming `services.ncps` to `services.nip`), the same
# JSON configuration file (nip reads ncps' configuration unchanged; see ./settings.nix) and the
# same systemd hardening. nip applies its database migrations itself at start, so there is no
# dbmate step.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nip;
  inherit (lib) mkOption types;

  # Declares a string/int/bool option with a default.
  opt =
    type: default: description:
    mkOption { inherit type default description; };
  nullStr = description: opt (types.nullOr types.str) null description;

  configFile = pkgs.writeText "nip-config.json" (builtins.toJSON (import ./settings.nix cfg));

  # Secrets reach nip as environment variables read from systemd credentials, never through
  # the (world-readable) store.
  wrapper = pkgs.writeShellScript "nip-wrapper" ''
    ${lib.optionalString (cfg.cache.secretKeyPath != null) ''
      export CACHE_SECRET_KEY_PATH="$CREDENTIALS_DIRECTORY/secretKey"
    ''}
    ${lib.optionalString (cfg.cache.storage.s3 != null && cfg.cache.secretKeyPath == null) ''
      export CACHE_SECRET_KEY_PATH=/var/lib/nip/secret-key
    ''}
    ${lib.optionalString (cfg.cache.storage.s3 != null) ''
      export CACHE_STORAGE_S3_ACCESS_KEY_ID="$(cat "$CREDENTIALS_DIRECTORY/s3AccessKeyId")"
      export CACHE_STORAGE_S3_SECRET_ACCESS_KEY="$(cat "$CREDENTIALS_DIRECTORY/s3SecretAccessKey")"
    ''}
    ${lib.optionalString (cfg.cache.redis != null && cfg.cache.redis.passwordFile != null) ''
      export CACHE_REDIS_PASSWORD="$(cat "$CREDENTIALS_DIRECTORY/redisPassword")"
    ''}
    ${lib.optionalString (cfg.cache.redis != null && cfg.cache.redis.password != null) ''
      export CACHE_REDIS_PASSWORD=${lib.escapeShellArg cfg.cache.redis.password}
    ''}
    ${lib.optionalString (cfg.cache.databaseURLFile != null) ''
      export CACHE_DATABASE_URL="$(cat "$CREDENTIALS_DIRECTORY/databaseURL")"
    ''}
    exec ${lib.getExe' cfg.package "nip"} --config ${configFile} "$@"
  '';

  # Path options as strings: a path literal (e.g. `/srv/cache` or a key file) must never be
  # copied into the world-readable store.
  str = toString;
  local = str cfg.cache.storage.local;
  tempPath = str cfg.cache.tempPath;
  useLocal = cfg.cache.storage.s3 == null;
  isSqlite = cfg.cache.databaseURL != null && lib.hasPrefix "sqlite:" cfg.cache.databaseURL;
  dbDir = dirOf (lib.removePrefix "sqlite:" cfg.cache.databaseURL);
  under = dir: path: path == dir || lib.hasPrefix "${dir}/" path;
  # Directories below /var/lib are systemd state directories: created with mode 0700 and, when
  # they exist with another owner (e.g. ncps' /var/lib/ncps), handed to the nip user
  # recursively. Others must be writable paths (ReadWritePaths) created by tmpfiles.
  inVarLib = lib.hasPrefix "/var/lib/";
  # With s3, nip's own signing key (taken over or generated) is kept in /var/lib/nip.
  stateDirs = lib.unique (
    lib.optional (useLocal && inVarLib local) (lib.removePrefix "/var/lib/" local)
    ++ lib.optional (!useLocal && cfg.cache.secretKeyPath == null) "nip"
    ++ lib.optional (
      isSqlite && inVarLib dbDir && !(useLocal && under local dbDir)
    ) (lib.removePrefix "/var/lib/" dbDir)
  );
  writable = lib.unique (
    lib.optional (useLocal && !inVarLib local) local
    ++ lib.optional (isSqlite && !inVarLib dbDir && !(useLocal && under local dbDir)) dbDir
    ++ lib.optional (tempPath != "/tmp") tempPath
  );
  created = lib.unique (
    lib.optional (useLocal && !inVarLib local) local
    ++ lib.optional isSqlite dbDir
    ++ lib.optional (tempPath != "/tmp") tempPath
  );
in
{
  imports = [
    (lib.mkRenamedOptionModule
      [ "services" "nip" "cache" "dataPath" ]
      [ "services" "nip" "cache" "storage" "local" ]
    )
    (lib.mkRenamedOptionModule
      [ "services" "nip" "upstream" "caches" ]
      [ "services" "nip" "cache" "upstream" "urls" ]
    )
    (lib.mkRenamedOptionModule
      [ "services" "nip" "upstream" "publicKeys" ]
      [ "services" "nip" "cache" "upstream" "publicKeys" ]
    )
    (lib.mkRemovedOptionModule [ "services" "nip" "dbmatePackage" ]
      "nip applies its database migrations itself: there is no dbmate to choose"
    )
    (lib.mkRemovedOptionModule [ "services" "nip" "cache" "lock" "postgresKeyPrefix" ]
      "the PostgreSQL lock backend was removed from ncps; nip instances coordinate through the database"
    )
  ];

  options.services.nip = {
    enable = lib.mkEnableOption "nip, a Nix binary cache proxy and artifact cache (drop-in for ncps)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = "nip, built from this flake's source (nix/package.nix)";
      description = "The nip package (its `bin/nip` is run).";
    };

    analytics.reporting = {
      enable = opt types.bool true "ncps' anonymous usage reporting. Accepted; nip never reports usage.";
      samples = lib.mkEnableOption "printing ncps' analytics samples (accepted; nip never reports usage)";
    };

    openTelemetry = {
      enable = lib.mkEnableOption "OpenTelemetry traces and logs";
      grpcURL = nullStr "OTLP gRPC endpoint (http:// or https://); null: to stdout.";
    };

    prometheus.enable = lib.mkEnableOption "Prometheus metrics on /metrics";

    logLevel = opt (types.enum [
      "trace"
      "debug"
      "info"
      "warn"
      "error"
      "fatal"
      "panic"
    ]) "info" "Log level.";

    netrcFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/nix/netrc";
      description = "netrc file with credentials for upstream caches.";
    };

    server.addr = opt types.str ":8501" "Address ([host]:port) to listen on.";

    cache = {
      allowDeleteVerb = lib.mkEnableOption "DELETE of narinfo and NAR files";
      allowPutVerb = lib.mkEnableOption "uploads with PUT (nix copy --to)";

      cdc = {
        enabled = lib.mkEnableOption "ncps' content-defined chunking (nip refuses true: it stores whole NARs)";
        min = opt types.ints.u32 16384 "CDC minimum chunk size (accepted, unused by nip).";
        avg = opt types.ints.u32 65536 "CDC average chunk size (accepted, unused by nip).";
        max = opt types.ints.u32 262144 "CDC maximum chunk size (accepted, unused by nip).";
      };

      hostName = mkOption {
        type = types.str;
        description = "Host name of the cache; names the generated signing key (<hostName>-1).";
      };

      databaseURL = mkOption {
        type = types.nullOr types.str;
        default = "sqlite:${toString cfg.cache.storage.local}/db/db.sqlite";
        defaultText = "sqlite:/var/lib/ncps/db/db.sqlite";
        description = "Database URL (sqlite:PATH or postgres://...). Exactly one of databaseURL and databaseURLFile.";
      };

      databaseURLFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File holding the database URL (passed as a systemd credential).";
      };

      database.pool = {
        maxOpenConns = opt types.int 0 "Database connections at most (0: nip's default).";
        maxIdleConns = opt types.int 0 "Idle database connections (accepted; nip's pool has no separate idle limit).";
      };

      lru = {
        schedule = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "0 2 * * *";
          description = "Cron schedule of the eviction that keeps the store under maxSize.";
        };
        scheduleTimeZone = mkOption {
          type = types.str;
          default = "Local";
          example = "America/Los_Angeles";
          description = "Time zone of the schedule (IANA name, UTC or Local).";
        };
      };

      # nip does not use Redis or distributed locks (instances coordinate through the shared
      # database), and logs these settings as unused; downloadTTL is how long an instance waits
      # for another's fetch of the same miss.
      lock = {
        backend = opt (types.enum [
          "local"
          "redis"
        ]) "local" "ncps' lock backend (accepted, unused by nip).";
        redisKeyPrefix = opt types.str "ncps:lock:" "Redis lock key prefix (accepted, unused by nip).";
        downloadTTL = opt types.str "5m0s" "Longest wait for another instance's fetch of the same miss.";
        lruTTL = opt types.str "30m0s" "LRU lock TTL (accepted, unused by nip).";
        retry = {
          maxAttempts = opt types.int 3 "Lock retry attempts (accepted, unused by nip).";
          initialDelay = opt types.str "100ms" "Lock retry initial delay (accepted, unused by nip).";
          maxDelay = opt types.str "2s" "Lock retry maximum delay (accepted, unused by nip).";
          jitter = opt types.bool true "Lock retry jitter (accepted, unused by nip).";
        };
        allowDegradedMode = opt types.bool false "Fall back to local locks (accepted, unused by nip).";
      };

      maxSize = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "100G";
        description = "Largest store size (units B, K, M, G, T); least recently used entries are evicted.";
      };

      redis = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              addresses = mkOption {
                type = types.listOf types.str;
                description = "Redis host:port addresses (accepted, unused by nip).";
              };
              database = opt types.int 0 "Redis database number (accepted, unused by nip).";
              username = nullStr "Redis user name (accepted, unused by nip).";
              password = nullStr "Redis password (accepted, unused by nip; ends up in the store).";
              passwordFile = mkOption {
                type = types.nullOr types.path;
                default = null;
                description = "File holding the Redis password (accepted, unused by nip).";
              };
              poolSize = opt types.int 10 "Redis pool size (accepted, unused by nip).";
              useTLS = opt types.bool false "TLS to Redis (accepted, unused by nip).";
            };
          }
        );
        default = null;
        description = "ncps' Redis settings (accepted, unused by nip).";
      };

      secretKeyPath = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = ''
          Signing key file (Nix format), passed as a systemd credential. null: taken over from
          ncps' database when there is one, else generated once; kept in storage.local
          (`secret-key`), or with s3 in /var/lib/nip/secret-key.
        '';
      };

      storage = {
        local = mkOption {
          type = types.path;
          default = "/var/lib/ncps";
          description = ''
            Directory for the cache's files. The default is ncps' directory, so that renaming
            `services.ncps` to `services.nip` keeps ncps' data and signing key (nip takes them
            over at its first start and leaves ncps' own files as they are). Unused with s3.
          '';
        };

        s3 = mkOption {
          type = types.nullOr (
            types.submodule {
              options = {
                bucket = mkOption {
                  type = types.str;
                  description = "S3 bucket.";
                };
                endpoint = mkOption {
                  type = types.str;
                  example = "https://s3.amazonaws.com";
                  description = "S3-compatible endpoint URL, with its scheme.";
                };
                forcePathStyle = opt types.bool false "Path-style addressing (MinIO and most self-hosted servers).";
                region = nullStr "S3 region.";
                accessKeyIdPath = mkOption {
                  type = types.path;
                  description = "File holding only the access key id.";
                };
                secretAccessKeyPath = mkOption {
                  type = types.path;
                  description = "File holding only the secret access key.";
                };
              };
            }
          );
          default = null;
          description = "Store NAR files in S3 instead of storage.local.";
        };
      };

      tempPath = opt types.path "/tmp" "Directory for downloads and uploads in progress.";

      signNarinfo = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = "Add this cache's signature to the narinfos it serves.";
      };

      upstream = {
        dialerTimeout = nullStr "Timeout to connect to an upstream (e.g. 3s).";
        responseHeaderTimeout = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "5s";
          description = "Timeout for an upstream's response headers.";
        };
        publicKeys = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
          description = "Public keys (name:base64) trusted to sign upstream narinfos.";
        };
        urls = mkOption {
          type = types.listOf types.str;
          example = [ "https://cache.nixos.org" ];
          description = "Upstream binary cache URLs.";
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = lib.xor (cfg.cache.databaseURL != null) (cfg.cache.databaseURLFile != null);
        message = "services.nip: set exactly one of cache.databaseURL and cache.databaseURLFile";
      }
      {
        assertion = cfg.cache.lru.schedule == null || cfg.cache.maxSize != null;
        message = "services.nip: cache.lru.schedule needs cache.maxSize";
      }
      {
        assertion =
          cfg.cache.redis == null || cfg.cache.redis.password == null || cfg.cache.redis.passwordFile == null;
        message = "services.nip: set cache.redis.password or cache.redis.passwordFile, not both";
      }
      {
        assertion = cfg.cache.lock.backend == "redis" -> cfg.cache.redis != null;
        message = "services.nip: cache.lock.backend = \"redis\" needs cache.redis";
      }
      {
        assertion = cfg.cache.redis != null -> cfg.cache.lock.backend == "redis";
        message = "services.nip: cache.redis needs cache.lock.backend = \"redis\"";
      }
    ];

    users.users.nip = {
      isSystemUser = true;
      group = "nip";
    };
    users.groups.nip = { };

    systemd.tmpfiles.settings.nip = lib.genAttrs created (_: {
      d = {
        user = "nip";
        group = "nip";
        mode = "0700";
      };
    });

    systemd.services.nip = {
      description = "nip binary cache";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];

      serviceConfig = lib.mkMerge [
        {
          ExecStart = "${wrapper} serve";
          User = "nip";
          Group = "nip";
          Restart = "on-failure";
          RuntimeDirectory = "nip";
        }
        (lib.mkIf (cfg.cache.secretKeyPath != null) {
          LoadCredential = [ "secretKey:${str cfg.cache.secretKeyPath}" ];
        })
        (lib.mkIf (cfg.cache.storage.s3 != null) {
          LoadCredential = [
            "s3AccessKeyId:${str cfg.cache.storage.s3.accessKeyIdPath}"
            "s3SecretAccessKey:${str cfg.cache.storage.s3.secretAccessKeyPath}"
          ];
        })
        (lib.mkIf (cfg.cache.redis != null && cfg.cache.redis.passwordFile != null) {
          LoadCredential = [ "redisPassword:${str cfg.cache.redis.passwordFile}" ];
        })
        (lib.mkIf (cfg.cache.databaseURLFile != null) {
          LoadCredential = [ "databaseURL:${str cfg.cache.databaseURLFile}" ];
        })
        (lib.mkIf (stateDirs != [ ]) {
          StateDirectory = stateDirs;
          StateDirectoryMode = "0700";
        })
        (lib.mkIf (writable != [ ]) { ReadWritePaths = writable; })
        # Hardening, as services.ncps. nip needs none of what it forbids: no privileged or
        # resource-changing system calls (LimitNOFILE below is set by systemd, not by nip) and
        # no writable executable memory (no JIT).
        {
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
            "~@resources"
          ];
          SystemCallArchitectures = "native";
          MemoryDenyWriteExecute = true;
          CapabilityBoundingSet = "";
          NoNewPrivileges = true;
          PrivateUsers = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateMounts = true;
          PrivateNetwork = false;
          DevicePolicy = "closed";
          DeviceAllow = [ "" ];
          ProtectSystem = "strict";
          ProtectHome = true;
          ProtectKernelModules = true;
          ProtectKernelTunables = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectHostname = true;
          ProtectClock = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictSUIDSGID = true;
          RestrictRealtime = true;
          RestrictNamespaces = true;
          RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
          LockPersonality = true;
          LimitNOFILE = 65536;
          UMask = "0066";
        }
      ];

      unitConfig.RequiresMountsFor = lib.concatStringsSep " " (
        lib.optional useLocal local ++ lib.optional isSqlite dbDir
      );
    };
  };
}
