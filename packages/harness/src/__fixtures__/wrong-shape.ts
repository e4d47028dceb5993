/** A default export that is not an MMU strategy. */
export default { name: 'wrong-shape', apiVersion: 1, create: 'not a function' }
