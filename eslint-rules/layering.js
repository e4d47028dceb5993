/**
 * mmusim/layering — enforces the package layering of shared/design/ARCHITECTURE.md.
 *
 * Imports only point down the list x86-hw < kvm < {shadow-mmu, tdp-mmu} ; x86-hw < guest ;
 * harness imports everything above it but reaches the MMU strategies only through its plugin
 * loader (a dynamic import of a computed specifier), never by a static import.
 * The two MMUs never import each other. Relative imports may not leave their package.
 */
import path from 'node:path'

/** package folder name -> @mmusim packages it may import */
export const LAYERS = {
  'x86-hw': [],
  kvm: ['x86-hw'],
  'shadow-mmu': ['kvm', 'x86-hw'],
  'tdp-mmu': ['kvm', 'x86-hw'],
  guest: ['x86-hw'],
  harness: ['x86-hw', 'kvm', 'guest'],
  bench: ['x86-hw', 'kvm', 'guest', 'harness', 'shadow-mmu', 'tdp-mmu'],
}

/** Tests and benchmarks may also drive the package with guest programs (never another MMU). */
const TEST_EXTRA = {
  kvm: ['guest'],
  'shadow-mmu': ['guest'],
  'tdp-mmu': ['guest'],
  harness: [],
}

function packageOf(filename) {
  const norm = filename.split(path.sep).join('/')
  const m = /\/(?:packages|apps)\/([^/]+)\//.exec(norm)
  return m ? m[1] : undefined
}

/** @type {import('eslint').Rule.RuleModule} */
const rule = {
  meta: {
    type: 'problem',
    docs: { description: 'Enforce the mmusim package layering (ARCHITECTURE.md)' },
    schema: [],
    messages: {
      badLayer:
        "Bad layering: '{{from}}' may not import '{{target}}'. Allowed @mmusim imports here: [{{allowed}}] (see shared/design/ARCHITECTURE.md).",
      escape: "Relative import '{{spec}}' leaves package '{{from}}'; import the package by name instead.",
    },
  },
  create(context) {
    const filename = context.filename
    const from = packageOf(filename)
    if (from === undefined || !(from in LAYERS)) return {}
    // Tests and a package's own benchmarks (bench/) may drive it with guest programs.
    const isTest = /\.(test|spec)\.ts$/.test(filename) || /\/(?:packages|apps)\/[^/]+\/bench\//.test(filename.split(path.sep).join('/'))
    // Package config files may import the shared root configs; source files may not leave the package.
    const isSource = !/\/[^/]+\.config\.ts$/.test(filename.split(path.sep).join('/'))
    const allowed = new Set([...LAYERS[from], ...(isTest ? (TEST_EXTRA[from] ?? []) : [])])
    const pkgRoot = filename.slice(0, filename.split(path.sep).join('/').lastIndexOf(`/${from}/`) + from.length + 1)

    function check(node, spec) {
      if (typeof spec !== 'string') return
      if (spec.startsWith('@mmusim/')) {
        const target = spec.slice('@mmusim/'.length).split('/')[0]
        if (target === from) return
        if (!allowed.has(target)) {
          context.report({ node, messageId: 'badLayer', data: { from, target, allowed: [...allowed].join(', ') } })
        }
      } else if (spec.startsWith('.') && isSource) {
        const resolved = path.resolve(path.dirname(filename), spec)
        if (!resolved.startsWith(pkgRoot)) context.report({ node, messageId: 'escape', data: { from, spec } })
      }
    }
    return {
      ImportDeclaration(node) { check(node, node.source.value) },
      ExportNamedDeclaration(node) { if (node.source) check(node, node.source.value) },
      ExportAllDeclaration(node) { check(node, node.source.value) },
      ImportExpression(node) { if (node.source.type === 'Literal') check(node, node.source.value) },
    }
  },
}

export default { meta: { name: 'mmusim-local', version: '0.0.0' }, rules: { layering: rule } }
