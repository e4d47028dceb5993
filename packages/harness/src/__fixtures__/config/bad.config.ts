export default { strategies: [], seeds: ['one'], colour: 'blue' }
