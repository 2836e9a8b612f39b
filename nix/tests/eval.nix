# Evaluates ../module.nix WITHOUT nixpkgs (not reachable where the tests run): with a stand-in
# `lib` that has only what the module uses, and `pkgs` whose writers return names instead of
# store paths. It checks what the module declares and produces, not the NixOS module system:
# no type checking, no priorities, merging is a plain recursive union (lists concatenated).
#
#   nix-instantiate --eval --strict --json nix/tests/eval.nix --argstr userConfigJSON '{...}'
#
# userConfigJSON: the values set under services.nip, as JSON; a string "<path>/x" stands for
# the path literal /x. Result:
#   options   "<path>\t<type>\t<default as JSON, - none, * not compared>" per option
#   imports   "renamed\t<from>\t<to>" / "removed\t<path>\t-" (paths below services.nip)
#   json      the configuration nip is started with (from ../settings.nix)
#   configFile  the name the module gives that file; it must be the one ExecStart uses
#   config    the module's `config`, mkIf/mkMerge resolved
{
  userConfigJSON ? "{}",
}:
let
  pathLiterals =
    v:
    if builtins.isAttrs v then
      builtins.mapAttrs (_: pathLiterals) v
    else if builtins.isList v then
      map pathLiterals v
    else if builtins.isString v && builtins.substring 0 6 v == "<path>" then
      /. + builtins.substring 6 (builtins.stringLength v) v
    else
      v;
  userConfig = pathLiterals (builtins.fromJSON userConfigJSON);

  isOption = v: builtins.isAttrs v && (v._type or null) == "option";
  mkType = name: extra: { inherit name; } // extra;

  lib = rec {
    types = {
      bool = mkType "bool" { };
      str = mkType "str" { };
      int = mkType "int" { };
      path = mkType "path" { };
      package = mkType "package" { };
      ints.u32 = mkType "ints.u32" { };
      nullOr = t: mkType "nullOr ${t.name}" { sub = t.sub or null; };
      listOf = t: mkType "listOf ${t.name}" { };
      enum = values: mkType "enum [ ${builtins.concatStringsSep " " values} ]" { };
      submodule = m: mkType "submodule" { sub = m.options; };
    };
    mkOption = args: args // { _type = "option"; };
    mkEnableOption =
      name:
      mkOption {
        type = types.bool;
        default = false;
        description = "Whether to enable ${name}.";
      };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkRenamedOptionModule = from: to: { stubImport = "renamed\t${path from}\t${path to}"; };
    mkRemovedOptionModule = from: _why: { stubImport = "removed\t${path from}\t-"; };
    path = p: builtins.concatStringsSep "." (builtins.tail (builtins.tail p));

    optional = cond: v: if cond then [ v ] else [ ];
    optionalString = cond: s: if cond then s else "";
    hasPrefix = pre: s: builtins.substring 0 (builtins.stringLength pre) s == pre;
    removePrefix =
      pre: s:
      if hasPrefix pre s then
        builtins.substring (builtins.stringLength pre) (builtins.stringLength s) s
      else
        s;
    unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
    genAttrs =
      names: f:
      builtins.listToAttrs (
        map (name: {
          inherit name;
          value = f name;
        }) names
      );
    xor = a: b: a != b;
    concatStringsSep = builtins.concatStringsSep;
    escapeShellArg = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
    getExe' = pkg: exe: "${pkg}/bin/${exe}";
  };

  pkgs = {
    # The default package: ../package.nix (evaluated on its own by the tests).
    callPackage = _file: _args: "/stub/nip";
    writeText = name: text: "/nix/store/${builtins.hashString "sha256" text}-${name}";
    # The script's text stands in for its path, so that ExecStart shows it.
    writeShellScript = name: text: "#${name}\n${text}\n#end ${name}";
  };

  module = import ../module.nix {
    inherit lib pkgs;
    config.services.nip = cfg;
  };

  # Option values: what userConfig sets, else the default; submodule values get their defaults.
  valuesOf =
    options: given:
    builtins.mapAttrs (
      name: o:
      if isOption o then
        let
          v =
            if given ? ${name} then
              given.${name}
            else
              o.default or (throw "services.nip: ${name} has no default: set it in userConfigJSON");
        in
        if v != null && (o.type.sub or null) != null then valuesOf o.type.sub v else v
      else
        valuesOf o (given.${name} or { })
    ) options;
  cfg = valuesOf module.options.services.nip userConfig;

  # "<path>\t<type>\t<default>" for every option, submodule options included.
  optionLines =
    prefix: options:
    builtins.concatLists (
      map (
        name:
        let
          o = options.${name};
          p = if prefix == "" then name else "${prefix}.${name}";
          default =
            if o.type.name == "package" then
              "*"
            else if o ? default then
              builtins.toJSON o.default
            else
              "-";
        in
        if isOption o then
          [ "${p}\t${o.type.name}\t${default}" ]
          ++ (if (o.type.sub or null) != null then optionLines p o.type.sub else [ ])
        else
          optionLines p o
      ) (builtins.attrNames options)
    );

  # mkIf / mkMerge, resolved: a false mkIf is nothing, sets are merged, lists concatenated.
  resolve =
    v:
    if builtins.isAttrs v && (v._type or null) == "if" then
      (if v.condition then resolve v.content else null)
    else if builtins.isAttrs v && (v._type or null) == "merge" then
      builtins.foldl' merge { } (builtins.filter (x: x != null) (map resolve v.contents))
    else if builtins.isAttrs v then
      builtins.mapAttrs (_: resolve) v
    else
      v;
  merge =
    a: b:
    a
    // builtins.mapAttrs (
      name: vb:
      if !(a ? ${name}) then
        vb
      else if builtins.isList vb then
        a.${name} ++ vb
      else if builtins.isAttrs vb then
        merge a.${name} vb
      else if a.${name} == vb then
        vb
      else
        throw "conflicting definitions of ${name}"
    ) b;
in
{
  options = optionLines "" module.options.services.nip;
  imports = map (i: i.stubImport) module.imports;
  json = builtins.toJSON (import ../settings.nix cfg);
  configFile = pkgs.writeText "nip-config.json" (builtins.toJSON (import ../settings.nix cfg));
  config = let c = resolve module.config; in if c == null then { } else c;
}
