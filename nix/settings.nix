# The JSON configuration `services.nip` writes, from its option values `cfg`: the document
# nixpkgs' `services.ncps` writes for the same options (nip reads ncps' configuration as it is).
# Settings left at null, "", [ ] or { } are left out, as there.
# Builtins only, so that it evaluates without nixpkgs (crates/nip/tests/e2e/packaging.rs).
cfg:
let
  c = cfg.cache;
  empty = v: v == null || v == "" || v == [ ] || v == { };
  # Keeps the non-empty values; tested before descending, so a set left empty only by its
  # children stays (as nixpkgs' lib.filterAttrsRecursive does).
  prune =
    set:
    builtins.listToAttrs (
      map (name: {
        inherit name;
        value = if builtins.isAttrs set.${name} then prune set.${name} else set.${name};
      }) (builtins.filter (name: !empty set.${name}) (builtins.attrNames set))
    );
  when = cond: set: if cond then set else { };
  s3 = c.storage.s3;
  # Path options as strings (a path literal is not copied into the store); null stays null.
  str = v: if v == null then null else toString v;
  redis = c.redis;
in
prune {
  analytics.reporting = {
    enabled = cfg.analytics.reporting.enable;
    inherit (cfg.analytics.reporting) samples;
  };
  log.level = cfg.logLevel;
  opentelemetry = when cfg.openTelemetry.enable {
    enabled = true;
    grpc-url = cfg.openTelemetry.grpcURL;
  };
  prometheus = when cfg.prometheus.enable { enabled = true; };
  server.addr = cfg.server.addr;
  cache = {
    hostname = c.hostName;
    allow-put-verb = c.allowPutVerb;
    allow-delete-verb = c.allowDeleteVerb;
    sign-narinfo = c.signNarinfo;
    database-url = c.databaseURL;
    database.pool.max-open-conns = c.database.pool.maxOpenConns;
    database.pool.max-idle-conns = c.database.pool.maxIdleConns;
    cdc = { inherit (c.cdc) enabled min avg max; };
    max-size = c.maxSize;
    lru.schedule = c.lru.schedule;
    lru.timezone = c.lru.scheduleTimeZone;
    temp-path = str c.tempPath;
    netrc-file = str cfg.netrcFile;
    storage =
      if s3 == null then
        { local = str c.storage.local; }
      else
        {
          s3 = {
            inherit (s3) bucket endpoint region;
            force-path-style = s3.forcePathStyle;
          };
        };
    upstream = {
      inherit (c.upstream) urls;
      public-keys = c.upstream.publicKeys;
      dialer-timeout = c.upstream.dialerTimeout;
      response-header-timeout = c.upstream.responseHeaderTimeout;
    };
    # Accepted by nip and logged as unused at start: nip instances coordinate through the
    # database, without Redis.
    lock = {
      inherit (c.lock) backend;
      redis.key-prefix = c.lock.redisKeyPrefix;
      download-lock-ttl = c.lock.downloadTTL;
      lru-lock-ttl = c.lock.lruTTL;
      retry = {
        max-attempts = c.lock.retry.maxAttempts;
        initial-delay = c.lock.retry.initialDelay;
        max-delay = c.lock.retry.maxDelay;
        inherit (c.lock.retry) jitter;
      };
      allow-degraded-mode = c.lock.allowDegradedMode;
    };
    redis = when (redis != null) {
      addrs = redis.addresses;
      db = redis.database;
      inherit (redis) username;
      use-tls = redis.useTLS;
      pool-size = redis.poolSize;
    };
  };
}
