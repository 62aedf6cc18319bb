// A form for one guidance policy, built from the JSON schema GET /policies publishes (pydantic's schema of the
// policy's Params): a new policy, or a new parameter, appears here without touching the page.

function field(schema) {
  // {type, nullable, enum, minimum, maximum, ...} of a property; anyOf [T, null] is a nullable T
  if (Array.isArray(schema.anyOf)) {
    const inner = schema.anyOf.filter((s) => s.type !== "null");
    if (inner.length === 1) return { ...schema, ...inner[0], anyOf: undefined, nullable: true };
    return { ...schema, type: "string", nullable: schema.anyOf.some((s) => s.type === "null") };
  }
  return { ...schema, nullable: false };
}

function input(name, f, id) {
  let el;
  if (Array.isArray(f.enum)) {
    el = document.createElement("select");
    if (f.nullable) el.append(new Option("(default)", ""));
    for (const value of f.enum) el.append(new Option(String(value), String(value)));
  } else if (f.type === "boolean") {
    el = document.createElement("input");
    el.type = "checkbox";
  } else {
    el = document.createElement("input");
    if (f.type === "number" || f.type === "integer") {
      el.type = "number";
      el.step = f.type === "integer" ? "1" : "any";
      const min = f.minimum ?? f.exclusiveMinimum;
      const max = f.maximum ?? f.exclusiveMaximum;
      if (min !== undefined) el.min = String(min);
      if (max !== undefined) el.max = String(max);
    } else {
      el.type = "text";
    }
  }
  el.id = id;
  el.name = name;
  el.dataset.kind = f.type || "string";
  if (f.nullable) el.dataset.nullable = "1";
  const value = f.default;
  if (el.type === "checkbox") el.checked = Boolean(value);
  else if (value === null || value === undefined) el.placeholder = "default";
  else el.value = String(value);
  return el;
}

/** Fill `container` with one labelled input per parameter of `schema`; returns a reader of the values. */
export function buildPolicyForm(container, schema, idPrefix) {
  container.replaceChildren();
  const inputs = [];
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    if (name === "name") continue;
    const f = field(raw);
    const el = input(name, f, `${idPrefix}-${name}`);
    const label = document.createElement("label");
    label.className = "param";
    label.title = f.description || "";
    label.append(`${f.title || name} `, el);
    if (f.description) {
      const help = document.createElement("small");
      help.textContent = f.description;
      label.append(help);
    }
    container.append(label);
    inputs.push(el);
  }
  return () => {
    // only the parameters that differ from the schema's defaults: the server fills in the rest
    const params = { name: schema.properties.name.const ?? schema.properties.name.default };
    for (const el of inputs) {
      const fallback = schema.properties[el.name].default;
      let value;
      if (el.type === "checkbox") value = el.checked;
      else {
        const text = el.value.trim();
        if (text === "") value = el.dataset.nullable ? null : fallback;
        else if (el.dataset.kind === "integer") value = Number.parseInt(text, 10);
        else if (el.dataset.kind === "number") value = Number(text);
        else value = text;
      }
      if (value !== undefined && value !== fallback) params[el.name] = value;
    }
    return params;
  };
}

/** A policy object as a spec string, for labels: 'apg:scale=10,eta=0'. */
export function policyLabel(policy) {
  const parts = Object.entries(policy).filter(([k, v]) => k !== "name" && v !== null).map(([k, v]) => `${k}=${v}`);
  return parts.length ? `${policy.name}:${parts.join(",")}` : policy.name;
}
