// Validates Prometheus Operator objects (ServiceMonitor, PrometheusRule, ...) against the JSON
// schemas of their CRDs, as generated into the npm package @kubernetes-models/prometheus-operator.
//
//   node scripts/validate-crds.mjs NODE_MODULES_DIR OBJECTS.json
//
// OBJECTS.json is a JSON array of objects. Exits 1 if any is invalid or of an unknown kind.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(file, "utf8"));
let failed = 0;
for (const object of objects) {
  const [group, version] = object.apiVersion.split("/");
  const name = `${object.kind}/${object.metadata?.name}`;
  const path = join(modules, "@kubernetes-models/prometheus-operator", group, version, `${object.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(path).href))[object.kind];
  } catch (error) {
    console.log(`${name}: no schema for ${object.apiVersion} ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`${name}: valid against the ${object.apiVersion} CRD schema`);
  } catch (error) {
    console.log(`${name}: ${error.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
